"""Checkpoint files written by this framework's ``train.py``: where they are and how to read them.

The loop (resume, ``init_from``) and the evaluator both need this; rebuilding a tokenizer
from a checkpoint is ``tokenizers.loading.load_tokenizer``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LAST = "last.ckpt"


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def find_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> str:
    """A ``.ckpt`` file, or a run directory (its ``checkpoints/last.ckpt``). ``key`` names the
    option in the error so that the message says what to fix."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        candidates = [checkpoint_dir(p) / LAST, p / LAST]
        for c in candidates:
            if c.is_file():
                return str(c)
        raise FileNotFoundError(
            f"{key}={path} is a directory without a checkpoint.\nLooked in: "
            + ", ".join(map(str, candidates))
            + f"\nFix: point {key} at a .ckpt file or at a run directory that has checkpoints/last.ckpt."
        )
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist. Fix: give a .ckpt file or a run directory.")
    return str(p)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    # Our own checkpoints hold the run config (plain containers) next to tensors.
    return torch.load(path, map_location="cpu", weights_only=False)
