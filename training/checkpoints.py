"""Checkpoint files of a training run: atomic writes, the one to resume, weights-only initialisation."""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from common.checkpoints import LAST, checkpoint_dir, find_checkpoint, load_checkpoint  # noqa: F401 (re-used names)

log = logging.getLogger(__name__)


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


def resolve_resume(ckpt_path: str | None, run_dir: str | os.PathLike, resume: str = "auto") -> str | None:
    """The checkpoint to resume from.

    ``ckpt_path`` may be a checkpoint file or a run directory (its
    ``checkpoints/last.ckpt`` is used). Without it and with ``resume=auto``, the current
    run directory's ``last.ckpt`` is resumed when present: that is what makes a
    requeued or resubmitted SLURM job continue by itself.
    """
    if ckpt_path:
        return find_checkpoint(ckpt_path, "ckpt_path")
    if resume == "auto":
        last = checkpoint_dir(run_dir) / LAST
        if last.is_file():
            log.info("Resuming from %s (resume=auto; set resume=never to start over).", last)
            return str(last)
    elif resume not in ("never", "auto"):
        raise ValueError(f"resume must be 'auto' or 'never', got {resume!r}")
    return None


def resolve_init_from(init_from: str) -> str:
    """``init_from``: a checkpoint file, a run directory (its ``checkpoints/last.ckpt``) or a
    released checkpoint (``pretrained:<name>:<path>``, fine-tuning a released tokenizer)."""
    from tokenizers.loading import resolve_spec

    return resolve_spec(str(init_from), "init_from")


def load_weights_into(module, spec: str | os.PathLike) -> None:
    """Weights-only initialisation (``init_from=``); optimizer state and step start fresh.

    From a run: tokenizer, EMA and discriminator. From a released checkpoint: the tokenizer
    and its EMA copy get the released weights; every tokenizer tensor must be covered (frozen
    teachers and LPIPS excepted: they load from their own files)."""
    from tokenizers.loading import is_released, load_tokenizer

    if is_released(spec):
        released, _ = load_tokenizer(str(spec))
        state = released.state_dict()
        targets = [("tokenizer", module.tokenizer)]
        if getattr(module, "ema", None) is not None:
            targets.append(("EMA", module.ema.module))
        for what, target in targets:
            missing, unexpected = target.load_state_dict(state, strict=False)
            if unexpected:
                raise RuntimeError(
                    f"init_from={spec}: the released weights do not fit the configured {what} "
                    f"({type(target).__name__}); not in the model: {unexpected[:8]}\n"
                    "Fix: choose the tokenizer config that matches the release (docs/pretrained.md).")
            if missing and what == "tokenizer":
                # training-only parts a release leaves out (e.g. FQGAN's semantic heads) start fresh
                log.warning("init_from=%s: %d tokenizer tensors are not in the release and start from "
                            "their initialisation: %s", spec, len(missing), ", ".join(missing[:10]))
        log.info("Initialised tokenizer and EMA weights from the released checkpoint %s.", spec)
        return
    state = load_checkpoint(spec)["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    log.info("Initialised weights from %s (%d missing, %d unexpected keys).", spec, len(missing), len(unexpected))

