"""gFID (and Inception Score) of a generator (``diffusion.samplers``): class-conditional
samples with the generator's own sampling settings (its paper's, saved with it; evaluate's
``generation.sampling`` overrides them), decoded by the frozen tokenizer, against the
Inception statistics of the generator's own training split (SPEC.md §8: "FID-50K of
class-conditional samples against ImageNet train statistics").

Reproducible across rank counts: sample i has label ``i % num_classes`` and its randomness
(noise for latent generators, the uniforms of every token draw for AR ones) from a
generator seeded with ``(seed, i)``; rank r draws samples r, r + W, ...
A generator over a 1D ordered sequence (FlexTok) is measured at every token count of
``generation.token_counts`` (default: the evaluator's ``token_counts``), giving one gFID per
count (``gfid_by_tokens``) and the plot ``gfid_tokens.png``.
Reference statistics are computed once per (training data, feature network) and cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from common.distributed import all_reduce_sum, rank, reduce_device, world_size
from common.metrics import to_uint8

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 8


def generator_tokenizer_checkpoint(path: str) -> str:
    """The tokenizer checkpoint a generator was trained on (from its saved facts)."""
    from evaluation.main import resolve_checkpoint
    from common.checkpoints import load_checkpoint

    ckpt = load_checkpoint(resolve_checkpoint(path))
    try:
        return ckpt["generator_facts"]["tokenizer_ckpt"]
    except KeyError:
        raise KeyError(f"{path} is not a generator checkpoint. Fix: pass checkpoints written by "
                       "`python train.py experiment=generator` in generators=[...].") from None


def build_inception_score(weights: str | None = None, random_features: bool = False):
    """torchmetrics' Inception Score on the same torch-fidelity Inception weights as FID (10
    splits), or on the smoke-test random network's outputs taken as logits."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    from common.metrics import RandomFeatures, find_inception_weights

    if random_features:
        return InceptionScore(feature=RandomFeatures(), splits=2)
    network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                 feature_extractor_weights_path=str(find_inception_weights(weights)), antialias=False)
    return InceptionScore(feature=network, splits=10)


def _reference_key(data_cfg: dict, feature: str, limit) -> str:
    blob = json.dumps({"data": data_cfg, "feature": feature, "limit": limit, "world": world_size()},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def reference_statistics(fid, data_cfg: dict, cache_dir: Path | None, feature: str, limit_batches: int | None,
                         device: torch.device) -> int:
    """Fill ``fid``'s real-image statistics from the training split (cached on disk).

    The cache holds the sums over all ranks; they are loaded into rank 0 only (other ranks
    keep zeros), so torchmetrics' cross-rank sum at ``compute`` gives them back exactly."""
    from data.splits import labelled, training_split_once

    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_reference_key(data_cfg, feature, limit_batches)}.pt"
    if path is None or not path.is_file():
        datamodule = instantiate({**data_cfg, "val_remainder": "pad"})
        for images, _ in labelled(training_split_once(datamodule, limit_batches)):
            fid.update(to_uint8(images.to(device)), real=True)
        dev = reduce_device(device)
        totals = {k: all_reduce_sum(getattr(fid, k).to(dev)).cpu()
                  for k in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")}
        if path is not None and rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(totals, path)
    else:
        totals = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in totals.items():
        setattr(fid, k, (v if rank() == 0 else torch.zeros_like(v)).to(getattr(fid, k).device))
    return int(totals["real_features_num_samples"])


def token_counts_for(module, cfg: DictConfig) -> list[int | None]:
    """[None] (the whole token set) except for 1D ordered sequences: each requested count <= length."""
    if module.facts["family"] != "sequence_ar":
        return [None]
    length = module.model.length
    asked = cfg.generation.get("token_counts") or cfg.get("token_counts") or [length]
    return sorted({min(int(k), length) for k in asked if int(k) >= 1}) or [length]


def describe_sampling(module, sampling: dict) -> str:
    s = {**module.sampling, **sampling}
    if module.facts["family"] == "latent_dit":
        channels = "all channels" if s.get("guided_channels") is None else f"the first {s['guided_channels']} channels"
        return (f"Euler {s.get('steps')} steps, shift {s.get('shift')} (t = 0 data), CFG {s.get('cfg_scale')} on "
                f"{channels} for t in {list(s.get('guidance_interval', [0.0, 1.0]))}")
    return (f"{module.facts['family']} with KV cache: CFG {s.get('cfg_scale')} on logits, temperature "
            f"{s.get('temperature')}, top-k {s.get('top_k')} (0 = all), top-p {s.get('top_p')}")


@torch.no_grad()
def evaluate_generator(checkpoint: str, cfg: DictConfig, device: torch.device,
                       make_fid: Callable[[], Any]) -> dict[str, Any]:
    """gFID (+ IS) of one generator checkpoint; every rank returns the same dict.
    ``previews``: (row label, first images) per token count."""
    from diffusion.samplers import load_generator
    from tokenizers.loading import load_tokenizer

    gen_cfg = cfg.generation
    module, saved = load_generator(checkpoint)
    module = module.to(device).eval()
    facts = module.facts
    tokenizer, _ = load_tokenizer(facts["tokenizer_ckpt"], ema=bool(saved.generator.get("tokenizer_ema", True)))
    tokenizer = tokenizer.to(device).eval()
    sampling = OmegaConf.to_container(gen_cfg.sampling, resolve=True) if gen_cfg.get("sampling") else {}
    decode_options = OmegaConf.to_container(cfg.decode_options, resolve=True) if cfg.get("decode_options") else {}

    data_cfg = OmegaConf.to_container(saved.data, resolve=True)
    random_features = bool(cfg.metrics.fid.random_features)
    feature = "random" if random_features else "inception"
    cache = Path(cfg.paths.cache_dir) / "fid_reference" if cfg.get("paths") else None
    total, per_batch, seed = int(gen_cfg.num_samples), int(gen_cfg.batch_size), int(gen_cfg.seed)
    mine = list(range(rank(), total, world_size()))

    by_tokens: dict[str, dict[str, float]] = {}
    previews: list[tuple[str | None, torch.Tensor]] = []
    n_ref = 0
    for k in token_counts_for(module, cfg):
        fid = make_fid().to(device)
        inception_score = (build_inception_score(cfg.metrics.fid.weights, random_features).to(device)
                           if gen_cfg.get("inception_score", True) else None)
        n_ref = reference_statistics(fid, data_cfg, cache, feature, gen_cfg.get("reference_batches"), device)
        preview = None
        for start in range(0, len(mine), per_batch):
            indices = mine[start:start + per_batch]
            images = module.sample_images(tokenizer, indices, sampling, seed, num_tokens=k,
                                          decode_options=decode_options)
            pixels = to_uint8(images)
            fid.update(pixels, real=False)
            if inception_score is not None:
                inception_score.update(pixels)
            if preview is None:
                preview = images[:PREVIEW_IMAGES].clamp(-1, 1).cpu()
        entry = {"gfid": float(fid.compute())}
        if inception_score is not None:
            entry["inception_score"] = float(inception_score.compute()[0])
        by_tokens[str(k) if k is not None else "all"] = entry
        previews.append((None if k is None else f"{k} tok", preview))
        log.info("gFID %s%s: %.3f", checkpoint, "" if k is None else f" at {k} tokens", entry["gfid"])

    headline = by_tokens[list(by_tokens)[-1]]  # the whole token set / the largest count
    result = {
        "checkpoint": str(checkpoint),
        "run": str(saved.get("run_name") or Path(checkpoint).parent.parent.name),
        "family": facts["family"],
        "gfid": headline["gfid"],
        "inception_score": headline.get("inception_score"),
        "num_samples": total,
        "note": sample_count_note(total),
        "sampling": describe_sampling(module, sampling) + f"; EMA weights, labels i % {facts['num_classes']}",
        "reference": f"{n_ref} training images of {data_cfg.get('_target_')} (resolution {data_cfg.get('resolution')})",
        "generator_parameters": sum(p.numel() for p in module.ema.module.parameters()),
        "train_steps": int(facts.get("global_step", -1)),
        "previews": previews,
    }
    if list(by_tokens) != ["all"]:
        result["gfid_by_tokens"] = {k: v["gfid"] for k, v in by_tokens.items()}
        result["inception_score_by_tokens"] = {k: v.get("inception_score") for k, v in by_tokens.items()}
    return result


def sample_count_note(num_samples: int) -> str:
    return "FID-50K" if num_samples >= 50000 else f"FID of {num_samples} samples (not comparable with FID-50K)"


def plot_gfid_against_tokens(results: list[dict], path: Path) -> bool:
    """gFID against the number of tokens, one line per generator with ``gfid_by_tokens``."""
    lines = [(r["run"], r["generation"]["gfid_by_tokens"]) for r in results
             if (r.get("generation") or {}).get("gfid_by_tokens")]
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in lines:
        counts = sorted(int(k) for k in values)
        ax.plot(counts, [values[str(k)] for k in counts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per image")
    ax.set_ylabel("gFID")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
