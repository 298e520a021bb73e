"""In-process training runs for the fault tests: ``train(cfg)`` as ``train.py`` calls it,
with a config composed like the command line's, shrunk so that a run takes seconds."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from helpers import ROOT

# debug=smoke, then smaller still: no LPIPS network, an 8-filter discriminator, synthetic
# images in memory, no image grids or progress bar.
TINY = [
    "debug=smoke", "data=synthetic", "run_name=fault", "loss.perceptual=null", "gan.discriminator.ndf=8",
    "tokenizer.encoder.width=8", "tokenizer.decoder.width=8", "tokenizer.quantizer.codebook_size=32",
    "callbacks.reconstruction_grid=null", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false", "trainer.limit_val_batches=1", "gan.disc_start=0", "cpu_threads=1",
]


def train_config(run_dir: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"paths.output_dir={run_dir}", *overrides])


def run(run_dir: Path, *overrides: str) -> dict:
    from training.run import train

    return train(train_config(run_dir, *overrides))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def non_finite_tensors(tree, prefix: str = "") -> list[str]:
    """Names of every tensor in a (nested) checkpoint that holds a NaN or an infinity."""
    bad: list[str] = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not torch.isfinite(tree).all():
            bad.append(prefix or "<tensor>")
    elif isinstance(tree, dict):
        for key, value in tree.items():
            bad += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            bad += non_finite_tensors(value, f"{prefix}[{i}]")
    return bad
