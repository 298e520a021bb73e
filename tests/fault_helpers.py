"""Helpers of the fault tests: in-process runs (``inprocess.train_in_process``, the real
``train(cfg)``), checkpoint loading, and a search for non-finite tensors."""
from __future__ import annotations

from pathlib import Path

import torch

from inprocess import FAST_RUN, train_in_process


def run(run_dir: Path, *overrides: str) -> dict:
    """``train.py hydra.run.dir=RUN_DIR <FAST_RUN> OVERRIDES`` in this process; its metrics."""
    return train_in_process(run_dir, list(overrides))[0]


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


__all__ = ["FAST_RUN", "load", "non_finite_tensors", "run"]
