"""Image-folder datamodule for the ImageNet folder layout::

    root/train/<class>/*.JPEG
    root/val/<class>/*.JPEG

Labels are indices into the sorted training class folders; validation folders must
use the same class names (ImageNet's raw val/ is flat: sort it into class folders
first, e.g. with the usual ``valprep.sh``). Same transforms and batch format as the
webdataset datamodule. An unreadable training image is counted and replaced by the
next readable one (batches keep their size); an unreadable validation image is counted
and replaced by a padding sample (label -1), so ranks stay in step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from data.common import SkipCounter, padding_sample
from data.mapstyle import MapStyleDataModule
from data.shards import scan_source
from data.transforms import EvalTransform, TrainTransform, decode_image


class ImageFileDataset(Dataset):
    """(path, label) pairs -> (image tensor, label), counting unreadable files.

    ``on_error="next"`` tries the following files (training); ``"pad"`` returns a
    padding sample (validation). Negative indices are padding samples.
    """

    MAX_CONSECUTIVE_FAILURES = 10

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: Callable,
        resolution: int,
        skips: SkipCounter,
        on_error: str = "next",
    ):
        if on_error not in ("next", "pad"):
            raise ValueError(f"on_error must be 'next' or 'pad', got {on_error!r}.")
        self.samples = list(samples)
        self.transform, self.resolution, self.skips, self.on_error = transform, resolution, skips, on_error

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            return padding_sample(self.resolution)
        for _ in range(self.MAX_CONSECUTIVE_FAILURES):
            path, label = self.samples[index]
            try:
                image = self.transform(decode_image(Path(path).read_bytes()))
            except Exception as exn:
                self.skips.record(str(path), exn)
                if self.on_error == "pad":
                    return padding_sample(self.resolution)
                index = (index + 1) % len(self.samples)
                continue
            self.skips.success()
            return image, label
        raise RuntimeError(
            f"{self.MAX_CONSECUTIVE_FAILURES} consecutive images up to {path} could not be read; "
            "the folder looks broken. Check the files (e.g. `python -m data.shards --verify`)."
        )


class ImageFolderDataModule(MapStyleDataModule):
    """root/train/<class>/*, root/val/<class>/* -> (images in [-1, 1], labels).

    Args:
        root: dataset folder holding ``train/`` and ``val/``.
        resolution, batch_size, num_workers: as everywhere in ``conf/data``.
        max_upscale: training short side drawn from [R, max_upscale * R].
        Other arguments: as ``MapStyleDataModule``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        max_upscale: float = 1.25,
        flip: bool = True,
        **kwargs,
    ):
        super().__init__(resolution=resolution, batch_size=batch_size, num_workers=num_workers, **kwargs)
        self.root = Path(os.path.expanduser(str(root)))
        self.train_transform = TrainTransform(resolution, max_upscale=max_upscale, flip=flip)
        self.eval_transform = EvalTransform(resolution)
        self.classes: list[str] | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not (self.root / "train").is_dir() or not (self.root / "val").is_dir():
            raise FileNotFoundError(
                f"{self.root} must hold train/<class>/* and val/<class>/* folders. Fix: set data.root to the "
                "folder that contains train/ and val/ (or use data=imagenet with shards)."
            )
        self.classes, splits = scan_source(self.root)
        for split in ("train", "val"):
            if not splits.get(split):
                raise FileNotFoundError(f"No images found in {self.root / split}/<class>/.")
        self.train_set = ImageFileDataset(
            [(p, label) for p, label, _ in splits["train"]], self.train_transform, self.resolution, self.skips, "next"
        )
        self.val_set = ImageFileDataset(
            [(p, label) for p, label, _ in splits["val"]], self.eval_transform, self.resolution, self.skips, "pad"
        )
