"""What ``python evaluate.py`` runs: every checkpoint through the same yardstick, then the
report (JSON per checkpoint, CSV, Markdown, PNG plots, W&B table).

Ranks: Lightning Fabric launches / joins the processes (``fabric.devices``, torchrun and
SLURM environments are detected); each rank evaluates its share of the validation split
and the numbers are reduced across ranks; rank 0 writes the files.
"""
from __future__ import annotations

import logging
import os
import pickle
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from evaluation import plots, report
from data.splits import first_images, validation_batches
from common.distributed import barrier, is_main
from common.metrics import MissingWeightsError, build_fid, build_lpips, fid_description, lpips_description
from tokenizers.loading import load_tokenizer, resolve_spec
from evaluation.runner import EvalSettings, evaluate_tokenizer, reconstruct, resolve_token_counts

log = logging.getLogger(__name__)

_AUTOCAST = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def launch(cfg: DictConfig):
    """A launched Fabric (processes started or joined) for ``cfg.fabric``."""
    from lightning_fabric import Fabric

    fabric = Fabric(**OmegaConf.to_container(cfg.fabric, resolve=True))
    fabric.launch()
    return fabric


class CheckpointsNotEvaluated(RuntimeError):
    """Some checkpoints could not be read; the report of the others was written (``results``)."""

    def __init__(self, message: str, results: list[dict] | None = None):
        super().__init__(message)
        self.results = results or []


def resolve_checkpoint(path: str) -> str:
    """A .ckpt file, a run directory (its checkpoints/last.ckpt) or a released checkpoint
    (``pretrained:<name>:<path>``, ``tokenizers.loading``)."""
    return resolve_spec(str(path), "checkpoints")


def run_name(cfg_saved: DictConfig, checkpoint: str, taken: set[str]) -> str:
    """The run's own name (``run_name`` in its config), made unique within the report."""
    name = str(cfg_saved.get("run_name") or Path(checkpoint).parent.parent.name or Path(checkpoint).stem)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}-{i}", i + 1
    taken.add(unique)
    return unique


def settings_from(cfg: DictConfig) -> EvalSettings:
    autocast = cfg.get("autocast")
    if autocast not in _AUTOCAST:
        raise ValueError(f"autocast must be one of {list(_AUTOCAST)}, got {autocast!r}")
    return EvalSettings(
        token_counts=list(cfg.token_counts) if cfg.get("token_counts") else None,
        decode_options=OmegaConf.to_container(cfg.decode_options, resolve=True) if cfg.get("decode_options") else {},
        spectrum_bands=int(cfg.spectrum_bands),
        autocast_dtype=_AUTOCAST[autocast],
    )


def conventions(cfg: DictConfig, lpips, settings: EvalSettings) -> dict[str, str]:
    return {
        "rFID": f"reconstructions of the validation split against its own originals; {fid_description(cfg.metrics.fid.random_features)}",
        "PSNR / SSIM": "mean of per-image values on [0, 255] pixels rounded to integers; SSIM Gaussian 11x11, sigma 1.5",
        "LPIPS": lpips_description(lpips),
        "usage / perplexity": "distinct codes over the whole split / codebook size; exp(entropy of code frequencies); per codebook, in codebook order",
        "HF share": f"fraction of orthonormal 2D-DCT energy at normalised radial frequency >= 0.5 ({settings.spectrum_bands} bands), latents from encode_latents vs RGB images",
        "throughput": "images/s per device over the split (first batch excluded as warm-up), "
                      f"{'autocast ' + str(settings.autocast_dtype) if settings.autocast_dtype else 'fp32'}",
        "data": f"{cfg.data.get('_target_', '?')} resolution {cfg.data.resolution}",
    }


def build_metrics(cfg: DictConfig):
    """(LPIPS module, FID factory). Weights are checked before any model or data is touched;
    every missing file is named in one error."""
    make_fid = partial(build_fid, weights=cfg.metrics.fid.weights, random_features=bool(cfg.metrics.fid.random_features),
                       float64_features=bool(cfg.metrics.fid.float64_features))
    lpips, missing = None, []
    try:
        lpips = build_lpips(cfg.metrics.lpips.weights, allow_random=bool(cfg.metrics.lpips.allow_random))
    except MissingWeightsError as error:
        missing.append(str(error))
    try:
        make_fid()
    except MissingWeightsError as error:
        missing.append(str(error))
    if missing:
        raise MissingWeightsError("\n\n".join(missing))
    return lpips, make_fid


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate ``cfg.checkpoints`` and write the report to ``cfg.out``; returns the results."""
    if not cfg.get("checkpoints") and not cfg.get("generators"):
        raise ValueError("Nothing to evaluate. Fix: pass checkpoints=[run_a/checkpoints/last.ckpt,...] "
                         "(run directories and released checkpoints pretrained:<name>:<path> work too) "
                         "and/or generators=[...].")
    out = Path(cfg.out)
    if (out / "report.md").exists() and not cfg.get("overwrite", False):
        raise FileExistsError(f"out={out} already holds a report (report.md). Fix: out=<a new folder>, or "
                              "overwrite=true to replace it.")
    fabric = launch(cfg)
    device = fabric.device
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    settings = settings_from(cfg)
    lpips, make_fid = build_metrics(cfg)
    datamodule = instantiate(cfg.data)
    limit = cfg.get("limit_batches")

    # A missing or unreadable checkpoint among good ones must not cost the others' report:
    # it is named in the report and in the error raised after the report is written.
    checkpoints, failed = [], {}
    for path in cfg.checkpoints or []:
        try:
            checkpoints.append(resolve_checkpoint(path))
        except FileNotFoundError as error:
            failed[str(path)] = str(error).split("\n")[0]
    generators = list(cfg.get("generators") or [])
    gen_tokenizers = []
    if generators:
        from evaluation.generation import generator_tokenizer_checkpoint

        gen_tokenizers = [resolve_checkpoint(generator_tokenizer_checkpoint(g)) for g in generators]
        checkpoints += [c for c in dict.fromkeys(gen_tokenizers) if c not in checkpoints]

    grid_inputs = first_images(validation_batches(datamodule, limit), int(cfg.grid_images)) if is_main() else None
    results, grid_rows, names, samples = [], [], set(), []
    for checkpoint in progress(checkpoints, "checkpoints", unit="ckpt"):
        try:
            tokenizer, saved_cfg = load_tokenizer(checkpoint, ema=bool(cfg.ema))
        except Exception as error:  # truncated, not a checkpoint, weights not matching its config
            if isinstance(error, FileNotFoundError):  # a missing file (released weights too): its message names the fix
                failed[checkpoint] = str(error)
                log.error("Skipping %s: %s", checkpoint, failed[checkpoint])
                continue
            reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
            unreadable = isinstance(error, (OSError, EOFError, pickle.UnpicklingError)) or "Stream" in reason
            failed[checkpoint] = f"cannot be loaded ({reason})" + (
                "; the file is truncated or not a checkpoint: copy it again" if unreadable else "")
            log.error("Skipping %s: %s", checkpoint, failed[checkpoint])
            continue
        name = run_name(saved_cfg, checkpoint, names)
        log.info("Evaluating %s (%s) on %s", name, type(tokenizer).__name__, device)
        batches = validation_batches(datamodule, limit)
        result = evaluate_tokenizer(
            tokenizer, progress(batches, name, unit="batch", leave=False, total=_count(batches, limit)),
            lpips=lpips, make_fid=make_fid,
            settings=settings, device=device,
        )
        trained_at = OmegaConf.select(saved_cfg, "data.resolution", default=None)
        result = {"run": name, "checkpoint": checkpoint, **result,
                  "source": OmegaConf.to_container(saved_cfg.source) if "source" in saved_cfg else None,
                  "conventions": conventions(cfg, lpips, settings),
                  "tokenizer_target": str(saved_cfg.tokenizer.get("_target_", "?")),
                  "trained_resolution": trained_at}
        if trained_at is not None and int(trained_at) != int(cfg.data.resolution):
            log.warning("%s was trained at %s px and is evaluated at %s px (data.resolution).",
                        name, trained_at, cfg.data.resolution)
        if is_main():
            counts = resolve_token_counts(tokenizer, result["facts"]["resolution"], settings.token_counts)
            recon = reconstruct(tokenizer, grid_inputs, counts, settings.decode_options, device)
            for k, images in recon.items():
                grid_rows.append((name if k is None else f"{name}\n{k} tok", images))
        results.append(result)
        del tokenizer
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if generators:
        from evaluation.generation import evaluate_generator

        for generator, tok_ckpt in zip(generators, gen_tokenizers):
            gen = evaluate_generator(resolve_checkpoint(generator), cfg, device=device, make_fid=make_fid)
            target = next(r for r in results if r["checkpoint"] == tok_ckpt)
            if target.get("generation"):  # a second generator on the same tokenizer: its own lines
                target = {**target, "run": run_name(OmegaConf.create({"run_name": f"{target['run']}+{gen['run']}"}),
                                                    tok_ckpt, names)}
                results.append(target)
            for label, images in gen.pop("previews"):
                samples.append((f"{target['run']}\n{gen['run']}" + (f"\n{label}" if label else ""), images))
            target["generation"] = gen

    problems = "\n".join(f"  {path}: {reason}" for path, reason in failed.items())
    if failed and not results:
        raise CheckpointsNotEvaluated(f"No checkpoint could be evaluated:\n{problems}\nFix: check the paths "
                                      "(a .ckpt file or a run directory with checkpoints/last.ckpt).")
    if is_main():
        write_outputs(results, out, grid_inputs, grid_rows, cfg, samples, failed)
    barrier()
    if failed:
        raise CheckpointsNotEvaluated(
            f"{len(failed)} checkpoint(s) could not be evaluated (the report of the others is in {out / 'report.md'}):\n{problems}",
            results)
    return results


def write_outputs(results: list[dict], out: Path, grid_inputs, grid_rows, cfg: DictConfig,
                  samples: list | None = None, failed: dict[str, str] | None = None) -> dict[str, str]:
    for r in results:
        report.write_json(r, out / f"{r['run']}.json")
    report.write_csv(results, out / "report.csv")
    files = {"reconstructions": "reconstructions.png", "rate-distortion": "rate_distortion.png",
             "DCT spectra": "spectra.png"}
    note = smoke_note(cfg, results)  # written on every plot too
    plots.reconstruction_grid(grid_inputs, grid_rows, out / files["reconstructions"], note)
    plots.rate_distortion(results, out / files["rate-distortion"], note)
    plots.spectra(results, out / files["DCT spectra"], note)
    if plots.codebook_usage(results, out / "codebook_usage.png", note):
        files["codebook usage"] = "codebook_usage.png"
    if samples:
        from evaluation.generation import plot_gfid_against_tokens

        plots.image_rows(samples, out / "generated_samples.png", note)
        files["generated samples (gFID)"] = "generated_samples.png"
        if plot_gfid_against_tokens(results, out / "gfid_tokens.png"):
            files["gFID against token count"] = "gfid_tokens.png"
    notes = [f"**{note}**"] if note else []
    for r in results:
        if r.get("trained_resolution") is not None and int(r["trained_resolution"]) != int(cfg.data.resolution):
            notes.append(f"`{r['run']}` was trained at {r['trained_resolution']} px and evaluated at "
                         f"{cfg.data.resolution} px.")
    for path, reason in (failed or {}).items():
        notes.append(f"**NOT EVALUATED** `{path}`: {reason}")
    if cfg.get("limit_batches"):
        notes.append(f"limit_batches={cfg.limit_batches} per rank: only part of the split was evaluated.")
    report.write_markdown(results, out / "report.md", files, notes)
    log_to_wandb(results, out, files, cfg)
    log.info("Report: %s", out / "report.md")
    return files


def progress(iterable, desc: str, **kwargs):
    """A progress bar on rank 0 (stderr), nothing on the other ranks."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=not is_main(), dynamic_ncols=True, **kwargs)


def _count(batches, limit: int | None) -> int | None:
    try:
        return len(batches)
    except TypeError:  # islice(limit_batches)
        return int(limit) if limit else None


def smoke_note(cfg: DictConfig, results: list[dict]) -> str | None:
    """The warning a report made with random feature networks carries (debug=smoke)."""
    if bool(cfg.metrics.fid.random_features) or any("RANDOM" in r["conventions"]["LPIPS"] for r in results):
        return "SMOKE RUN: random feature networks; rFID / LPIPS values only check the pipeline."
    return None


def log_to_wandb(results: list[dict], out: Path, files: dict[str, str], cfg: DictConfig) -> None:
    """The same table and plots as a W&B run (``logger=wandb``; offline without credentials,
    decided by ``common.loggers``). Other loggers have no tables and are ignored here."""
    spec = (cfg.get("logger") or {}).get("wandb")
    if not spec:
        return
    from common.loggers import wandb_logger

    # built from the few keys that mean something here (the train-side config interpolates
    # the tokenizer choice, which an evaluation does not have)
    logger = wandb_logger(save_dir=str(out), project=spec.get("project", "tokbench"),
                          name=f"eval-{'-'.join(r['run'] for r in results)}"[:120], group=spec.get("group"),
                          tags=["evaluation"])
    keys, lines = report.table(results)
    logger.log_table(key="evaluation/report", columns=keys,
                     data=[[report._csv_value(v) for v in line] for line in lines])
    for name, file in files.items():
        logger.log_image(key=f"evaluation/{name.replace(' ', '_')}", images=[str(out / file)])
    logger.experiment.finish()


def main(cfg: DictConfig) -> list[dict[str, Any]]:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"))
    return evaluate(cfg)
