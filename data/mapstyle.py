"""Base datamodule for map-style datasets (image folders, synthetic images).

Training: a DistributedSampler with ``drop_last`` gives every rank floor(N / world_size)
shuffled samples, and the DataLoader drops the last partial batch, so every rank runs
the same number of batches. Validation: ``RankRangeSampler`` (``data.common``).
Both samplers are DistributedSampler instances built with the rank given explicitly,
so Lightning does not replace them.

A dataset item with index ``RankRangeSampler.PADDING_INDEX`` is a padding sample.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data.common import (
    RankRangeSampler,
    RankSplit,
    SkipCounter,
    check_resolution,
    collate,
    resolve_rank,
    split_for_rank,
)


class MapStyleDataModule(pl.LightningDataModule):
    """Subclasses set ``self.train_set`` and ``self.val_set`` in ``setup``."""

    def __init__(
        self,
        resolution: int,
        batch_size: int,
        num_workers: int = 0,
        val_batch_size: int | None = None,
        val_remainder: str = "drop",
        seed: int = 0,
        pin_memory: bool | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.resolution = check_resolution(resolution)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        split_for_rank(1, 0, 1, val_remainder)  # validates the policy name now
        self.val_remainder = val_remainder
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._rank, self._world_size = rank, world_size
        self.skips = SkipCounter()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.val_split: RankSplit | None = None

    def skipped_samples(self) -> int:
        """Samples skipped as unreadable so far in this process (all its workers)."""
        return self.skips.total

    def rank_and_world_size(self) -> tuple[int, int]:
        return resolve_rank(self.trainer, self._rank, self._world_size)

    def _loader(self, dataset: Dataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        rank, world_size = self.rank_and_world_size()
        if len(self.train_set) < self.batch_size * world_size:
            raise ValueError(
                f"{len(self.train_set)} training samples cannot fill one batch of {self.batch_size} on each of "
                f"{world_size} ranks. Fix: lower data.batch_size or add training images."
            )
        sampler = DistributedSampler(
            self.train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )
        return self._loader(self.train_set, sampler, self.batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        rank, world_size = self.rank_and_world_size()
        self.val_split = split_for_rank(len(self.val_set), rank, world_size, self.val_remainder)
        return self._loader(self.val_set, RankRangeSampler(self.val_set, self.val_split), self.val_batch_size, False)
