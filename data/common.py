"""Pieces shared by the datamodules: skip counting, rank splitting, collation.

Validation is split across ranks by one rule everywhere: the N validation samples are
numbered 0..N-1 (a fixed order), and rank r takes the contiguous range
[r * q, (r + 1) * q). Every rank therefore sees the same number of samples q and
yields the same number of batches, so no rank waits on another at epoch-end
collectives, and across ranks every sample is seen at most once. Two remainder
policies (``val_remainder``):

- ``"drop"`` (default, for validation during training): q = N // world_size; the last
  N % world_size samples (fewer than world_size) are not evaluated.
- ``"pad"`` (for evaluation that must count every image exactly once):
  q = ceil(N / world_size); ranks whose range runs past N are filled up with padding
  samples whose label is ``PADDING_LABEL``. Drop those rows before computing metrics.

A validation sample that cannot be decoded is also replaced by a padding sample, so
batch counts stay equal across ranks even with corrupt data.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)

PADDING_LABEL = -1
"""Label of a padding sample in a validation batch: not a real image, ignore the row."""

VAL_REMAINDER_POLICIES = ("drop", "pad")


class DataUnreadableError(RuntimeError):
    """Too many samples or shards in a row could not be read: the data, not a few files, is broken."""


class SkipCounter:
    """Counts samples skipped because they could not be read or decoded.

    DataLoader workers are separate processes, so the count lives in shared memory
    (a ``multiprocessing.Value`` inherited by the workers); ``total`` read in the main
    process is the sum over all workers of this rank. The first ``warn_first`` skips
    are logged with their key, later ones are only counted.

    ``max_consecutive`` failures in a row in one process (worker), with no readable sample
    in between, raise ``DataUnreadableError``: a resampled training stream whose shards
    are all unreadable would otherwise retry forever and the run would hang silently.
    A good sample (``success``) resets the streak.
    """

    def __init__(self, warn_first: int = 5, max_consecutive: int = 1000):
        self._count = multiprocessing.Value("q", 0)
        self.warn_first = warn_first
        self.max_consecutive = max_consecutive
        self._streak = 0  # per process: every worker holds its own copy

    @property
    def total(self) -> int:
        return int(self._count.value)

    def success(self) -> None:
        self._streak = 0

    def record(self, key: str | None, reason: BaseException | str) -> None:
        with self._count.get_lock():
            self._count.value += 1
            count = self._count.value
        if count <= self.warn_first:
            log.warning("Skipped unreadable sample %s: %s", key or "<unknown key>", _short(reason))
        if count == self.warn_first:
            log.warning("Further unreadable samples are skipped and counted without a message each.")
        self._streak += 1
        if self.max_consecutive and self._streak >= self.max_consecutive:
            raise DataUnreadableError(
                f"{self._streak} samples or shards in a row could not be read, none in between (last: "
                f"{key or 'a shard'}: {_short(reason)}). The data looks unreadable, not just a few files. "
                "Fix: check data.root and the shard patterns, and that the shards are complete tar files with "
                "images (python -m data.shards SRC OUT --verify rewrites them); data.max_consecutive_failures "
                "sets this limit."
            ) from (reason if isinstance(reason, BaseException) else None)

    def handler(self, exn: BaseException) -> bool:
        """webdataset exception handler: count, warn, continue (never re-raise), up to
        ``max_consecutive`` failures in a row."""
        self.record(None, exn)
        return True


def _short(reason: BaseException | str, limit: int = 300) -> str:
    text = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    return text if len(text) <= limit else text[:limit] + "..."


def resolve_rank(trainer=None, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) of this process: explicit values, else the Lightning trainer,
    else an initialised torch.distributed process group, else (0, 1).

    Read in the main process when the dataloaders are built, then handed to the
    pipelines as plain numbers, so DataLoader workers never have to rediscover it.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(f"Give both rank and world_size or neither (got rank={rank}, world_size={world_size}).")
    if rank is None:
        if trainer is not None:
            rank, world_size = trainer.global_rank, trainer.world_size
        elif dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size): got rank={rank}, world_size={world_size}.")
    return int(rank), int(world_size)


@dataclass(frozen=True)
class RankSplit:
    """This rank's share of an ordered validation set (see the module docstring)."""

    total: int  # samples in the validation set
    rank: int
    world_size: int
    start: int  # first global index of this rank
    stop: int  # one past the last real global index of this rank
    per_rank: int  # samples yielded per rank, padding included (equal on every rank)
    remainder: str

    @property
    def padding(self) -> int:
        """Padding samples this rank appends after its real ones."""
        return self.per_rank - (self.stop - self.start)

    @property
    def evaluated(self) -> int:
        """Real samples evaluated across all ranks together."""
        return self.total if self.remainder == "pad" else self.per_rank * self.world_size

    @property
    def dropped(self) -> int:
        """Samples no rank evaluates (``drop`` policy only; fewer than world_size)."""
        return self.total - self.evaluated


def split_for_rank(total: int, rank: int, world_size: int, remainder: str = "drop") -> RankSplit:
    if remainder not in VAL_REMAINDER_POLICIES:
        raise ValueError(f"val_remainder must be one of {VAL_REMAINDER_POLICIES}, got {remainder!r}.")
    if total <= 0:
        raise ValueError("The validation set is empty: check the validation shards / folder.")
    if remainder == "drop":
        per_rank = total // world_size
        if per_rank == 0:
            raise ValueError(
                f"The validation set has {total} samples, fewer than the {world_size} ranks, so dropping the "
                "remainder would leave nothing. Fix: set data.val_remainder=pad, or use a larger validation set."
            )
        start = rank * per_rank
        stop = start + per_rank
    else:
        per_rank = math.ceil(total / world_size)
        start = min(rank * per_rank, total)
        stop = min(start + per_rank, total)
    return RankSplit(total, rank, world_size, start, stop, per_rank, remainder)


class RankRangeSampler(DistributedSampler):
    """Validation sampler: this rank's contiguous range, then ``PADDING_INDEX`` for padding.

    Subclasses DistributedSampler only so that Lightning recognises it as already
    distributed and does not wrap it in a second split.
    """

    PADDING_INDEX = -1

    def __init__(self, dataset: Dataset, split: RankSplit):
        super().__init__(dataset, num_replicas=split.world_size, rank=split.rank, shuffle=False)
        self.split = split

    def __iter__(self) -> Iterator[int]:
        yield from range(self.split.start, self.split.stop)
        yield from [self.PADDING_INDEX] * self.split.padding

    def __len__(self) -> int:
        return self.split.per_rank


def padding_sample(resolution: int) -> tuple[torch.Tensor, int]:
    return torch.zeros(3, resolution, resolution), PADDING_LABEL


def collate(samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (image (3, R, R), label) -> (images (B, 3, R, R) float32, labels (B,) int64)."""
    images = torch.stack([image for image, _ in samples]).float()
    labels = torch.tensor([int(label) for _, label in samples], dtype=torch.int64)
    return images, labels


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"data.resolution must be an integer >= 8, got {resolution!r}.")
    return resolution
