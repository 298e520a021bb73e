"""Procedural images generated in memory, for unit tests: no disk, deterministic in the seed.

Each image is a colour gradient, a class-dependent stripe pattern (frequency and angle
depend on the label, so a generator has something class-specific to learn) and a few
soft coloured blobs. Image i of a split is a function of (seed, split, i) only.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from data.common import padding_sample
from data.mapstyle import MapStyleDataModule


class ProceduralImages(Dataset):
    def __init__(self, num_samples: int, resolution: int, num_classes: int = 4, seed: int = 0):
        if num_samples < 1 or num_classes < 1:
            raise ValueError(f"num_samples and num_classes must be >= 1, got {num_samples}, {num_classes}.")
        self.num_samples, self.resolution, self.num_classes, self.seed = num_samples, resolution, num_classes, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            return padding_sample(self.resolution)
        if index >= self.num_samples:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % self.num_classes

        def uniform(*shape, low=0.0, high=1.0):
            return low + (high - low) * torch.rand(*shape, generator=generator)

        axis = torch.linspace(0.0, 1.0, self.resolution)
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        angle = float(uniform(1, high=2 * math.pi))
        ramp = (x * math.cos(angle) + y * math.sin(angle) + 1.5) / 3.0  # in (0, 1)
        low_colour, high_colour = uniform(3, 1, 1, low=-0.8, high=0.8), uniform(3, 1, 1, low=-0.8, high=0.8)
        image = low_colour * (1 - ramp) + high_colour * ramp
        stripe_angle = math.pi * label / self.num_classes
        frequency = 2 + 2 * label
        stripes = torch.sin(2 * math.pi * frequency * (x * math.cos(stripe_angle) + y * math.sin(stripe_angle)))
        image = image + 0.25 * stripes
        for _ in range(3):
            centre, sigma = uniform(2), float(uniform(1, low=0.05, high=0.25))
            blob = torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2))
            image = image * (1 - blob) + uniform(3, 1, 1, low=-1.0, high=1.0) * blob
        return image.clamp(-1.0, 1.0).float(), label


class SyntheticDataModule(MapStyleDataModule):
    """Procedural train/val images (different seeds per split); same batches as every datamodule."""

    def __init__(
        self,
        resolution: int = 32,
        batch_size: int = 4,
        num_workers: int = 0,
        num_train: int = 64,
        num_val: int = 16,
        num_classes: int = 4,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(resolution=resolution, batch_size=batch_size, num_workers=num_workers, seed=seed, **kwargs)
        self.num_train, self.num_val, self.num_classes = num_train, num_val, num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = ProceduralImages(self.num_train, self.resolution, self.num_classes, seed=2 * self.seed)
            self.val_set = ProceduralImages(self.num_val, self.resolution, self.num_classes, seed=2 * self.seed + 1)
