"""gFID of a latent generator (``training.generator_module``): class-conditional samples
with classifier-free guidance, decoded by the frozen tokenizer, against the Inception
statistics of the generator's own training split (SPEC.md §8: "FID-50K of
class-conditional samples against ImageNet train statistics").

Reproducible across rank counts: sample i has label ``i % num_classes`` and noise drawn
from a generator seeded with ``(seed, i)``; rank r draws samples r, r + W, ...
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


def generator_tokenizer_checkpoint(path: str) -> str:
    """The tokenizer checkpoint a generator was trained on (from its saved config)."""
    from evaluation.main import resolve_checkpoint
    from common.checkpoints import load_checkpoint

    ckpt = load_checkpoint(resolve_checkpoint(path))
    try:
        return ckpt["generator_facts"]["tokenizer_ckpt"]
    except KeyError:
        raise KeyError(f"{path} is not a latent generator checkpoint. Fix: pass checkpoints written by "
                       "`python train.py experiment=generator` in generators=[...].") from None


def sample_noise(indices: list[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise of each sample index from its own seeded generator (independent of batching and ranks)."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


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


@torch.no_grad()
def evaluate_generator(checkpoint: str, cfg: DictConfig, device: torch.device,
                       make_fid: Callable[[], Any]) -> dict[str, Any]:
    """gFID of one generator checkpoint; every rank returns the same dict."""
    from tokenizers.loading import load_tokenizer
    from training.generator_module import load_generator

    gen_cfg = cfg.generation
    module, saved = load_generator(checkpoint)
    facts = module.facts
    model = module.ema.module.to(device).eval()
    module = module.to(device)
    tokenizer, _ = load_tokenizer(facts["tokenizer_ckpt"], ema=bool(saved.generator.get("tokenizer_ema", True)))
    tokenizer = tokenizer.to(device).eval()

    fid = make_fid().to(device)
    data_cfg = OmegaConf.to_container(saved.data, resolve=True)
    feature = "random" if cfg.metrics.fid.random_features else "inception"
    cache = Path(cfg.paths.cache_dir) / "fid_reference" if cfg.get("paths") else None
    n_ref = reference_statistics(fid, data_cfg, cache, feature, gen_cfg.get("reference_batches"), device)

    total, per_batch = int(gen_cfg.num_samples), int(gen_cfg.batch_size)
    mine = list(range(rank(), total, world_size()))
    shape = (model.in_channels, model.input_size, model.input_size)
    preview = None
    for start in range(0, len(mine), per_batch):
        indices = mine[start:start + per_batch]
        y = torch.tensor([i % model.num_classes for i in indices], device=device)
        noise = sample_noise(indices, shape, int(gen_cfg.seed)).to(device)
        latents = model.sample(y, steps=int(gen_cfg.steps), guidance=float(gen_cfg.guidance),
                               guidance_interval=tuple(gen_cfg.guidance_interval), shift=float(gen_cfg.shift),
                               noise=noise)
        images = tokenizer.decode_latents(module.denormalize(latents)).float()
        fid.update(to_uint8(images), real=False)
        if preview is None:
            preview = images[:8].clamp(-1, 1).cpu()
    gfid = float(fid.compute())
    interval = list(gen_cfg.guidance_interval)
    return {
        "checkpoint": str(checkpoint),
        "gfid": gfid,
        "num_samples": total,
        "note": sample_count_note(total),
        "sampling": f"Euler {gen_cfg.steps} steps, shift {gen_cfg.shift}, CFG {gen_cfg.guidance} on all channels "
                    f"for t in {interval} (t=0 data), EMA weights, labels i % {model.num_classes}",
        "reference": f"{n_ref} training images of {data_cfg.get('_target_')} (resolution {data_cfg.get('resolution')})",
        "generator_parameters": sum(p.numel() for p in model.parameters()),
        "train_steps": int(facts.get("global_step", -1)),
        "preview": preview,
    }


def sample_count_note(num_samples: int) -> str:
    return "FID-50K" if num_samples >= 50000 else f"FID of {num_samples} samples (not comparable with FID-50K)"
