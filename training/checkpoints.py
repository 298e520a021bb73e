"""Checkpoint files: atomic writes, finding the one to resume, rebuilding a tokenizer."""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota); the previous file is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to ``<path>.tmp``, flushes it to disk, then renames: a job killed mid-save
    (``kill -9``, preemption, time limit, node crash) leaves the previous checkpoint intact
    instead of a truncated file. A failed write (disk full) removes its temporary file and
    says so, naming the intact previous checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())  # the rename must never expose data still in the page cache
            os.replace(tmp, path)
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointWriteError(error.errno, _disk_full_message(path, error)) from error
            raise
        _fsync_directory(path.parent)


def _disk_full_message(path: Path, error: OSError) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there now"
    except OSError:
        free = "free space unknown"
    previous = f"the previous {path.name} is intact" if path.is_file() else f"no earlier {path.name} existed"
    return (f"Could not write checkpoint {path}: {error.strerror or error} ({free}). The partial file was removed; "
            f"{previous}. Fix: free disk space (or point paths.log_dir at a larger disk) and run the same "
            "command again: it resumes from the last checkpoint.")


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # makes the rename itself durable
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def resolve_resume(ckpt_path: str | None, run_dir: str | os.PathLike, resume: str = "auto") -> str | None:
    """The checkpoint to resume from.

    ``ckpt_path`` may be a checkpoint file or a run directory (its
    ``checkpoints/last.ckpt`` is used). Without it and with ``resume=auto``, the current
    run directory's ``last.ckpt`` is resumed when present: that is what makes a
    requeued or resubmitted SLURM job continue by itself.
    """
    if ckpt_path:
        p = Path(os.path.expanduser(str(ckpt_path)))
        if p.is_dir():
            candidates = [checkpoint_dir(p) / LAST, p / LAST]
            for c in candidates:
                if c.is_file():
                    return str(c)
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path} is a directory without a checkpoint.\nLooked in: "
                + ", ".join(map(str, candidates))
                + "\nFix: point ckpt_path at a .ckpt file or at a run directory that has checkpoints/last.ckpt."
            )
        if not p.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist. Fix: give a .ckpt file or a run directory.")
        return str(p)
    if resume == "auto":
        last = checkpoint_dir(run_dir) / LAST
        if last.is_file():
            log.info("Resuming from %s (resume=auto; set resume=never to start over).", last)
            return str(last)
    elif resume not in ("never", "auto"):
        raise ValueError(f"resume must be 'auto' or 'never', got {resume!r}")
    return None


def resolve_init_from(init_from: str) -> str:
    """``init_from``: a checkpoint file or a run directory (its ``checkpoints/last.ckpt``)."""
    p = Path(os.path.expanduser(str(init_from)))
    for candidate in (p, checkpoint_dir(p) / LAST, p / LAST):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"init_from={init_from} is not a checkpoint file or a run directory with checkpoints/last.ckpt.\n"
        "Fix: init_from=<previous stage run dir> or init_from=<run>/checkpoints/last.ckpt."
    )


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    # Our own checkpoints hold the run config (plain containers) next to tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def load_tokenizer(path: str | os.PathLike, ema: bool = True, overrides: dict | None = None):
    """Rebuild a tokenizer from a checkpoint alone: ``(tokenizer in eval mode, config)``.

    Uses the run config saved in the checkpoint, then loads the EMA weights (``ema=True``,
    what validation used) or the raw training weights.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise KeyError(f"{path} has no saved run config; it was not written by this framework's train.py.")
    cfg = OmegaConf.create(ckpt["config"])
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    tok_cfg = cfg.tokenizer.copy()
    if "load_teachers" in tok_cfg:
        tok_cfg.load_teachers = False  # encode/decode never need the teachers' weights
    tokenizer = instantiate(tok_cfg)
    state = ckpt["state_dict"]
    prefix = "ema.module." if ema and any(k.startswith("ema.module.") for k in state) else "tokenizer."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = tokenizer.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if not _is_optional(m)]:
        raise RuntimeError(f"{path}: weights do not match the saved config. missing={missing[:5]} unexpected={unexpected[:5]}")
    tokenizer.eval()
    return tokenizer, cfg


def _is_optional(key: str) -> bool:
    return key.endswith(("recent_indices", "recent_pos"))


def load_weights_into(module, path: str | os.PathLike) -> None:
    """Weights-only initialisation (``init_from=``): tokenizer (and EMA, discriminator
    when present) from a previous run; optimizer state and step start fresh."""
    state = load_checkpoint(path)["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    log.info("Initialised weights from %s (%d missing, %d unexpected keys).", path, len(missing), len(unexpected))
