"""Demo data: real photographs that ship inside scikit-image, no download.

Twelve photographs (the class label is the photograph's index in ``DEMO_PHOTOS``) are
cut into random square crops of 30-100 % of their short side, resized to
``crop_px`` (a little above 1.25 x the training resolution, so the training
augmentation only ever shrinks) and written ONCE as JPEG into webdataset shards under
``cache_dir``. They are then read by exactly the same ``WebDatasetDataModule`` as
ImageNet, so the default run exercises the real pipeline.

Validation split: other random crops (different seed) of the SAME photographs. It
measures how well a tokenizer fits these photographs, not generalisation to unseen
images; with twelve photographs there is nothing better to hold out, and sharing the
classes keeps labels meaningful for class-conditional generators.

Writing is done under an exclusive file lock into a temporary folder that is renamed
into place when complete, so concurrent DDP ranks neither write twice nor read a half
written set. Every parameter that changes the content is in the folder's name.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data.shards import INDEX_FILE, SplitWriter, write_index
from data.webdataset_module import WebDatasetDataModule

log = logging.getLogger(__name__)

# Photographs bundled with scikit-image 0.26 (checked: these load without pooch or a
# network; brain, eagle, lily, skin etc. need a download and are left out).
DEMO_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field",
    "retina", "immunohistochemistry", "camera", "coins", "moon", "brick",
)
DEMO_VERSION = 2  # bump when the cropping recipe changes, so old caches are not reused


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of one bundled photograph (grey ones replicated to RGB)."""
    import skimage.data

    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def demo_crop_px(resolution: int) -> int:
    """Stored crop side: >= 96 and >= 1.25 x resolution, a multiple of 16."""
    return max(96, 16 * math.ceil(1.25 * resolution / 16))


def random_crops(photo: Image.Image, count: int, crop_px: int, rng: random.Random) -> list[bytes]:
    """``count`` JPEG-encoded random square crops (30-100 % of the short side)."""
    # Shrink very large photographs first: a crop never needs more than 4x its stored size.
    short = min(photo.size)
    if short > 4 * crop_px:
        scale = 4 * crop_px / short
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
        short = min(photo.size)
    crops = []
    for _ in range(count):
        side = max(8, round(rng.uniform(0.3, 1.0) * short))
        left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        crop = photo.crop((left, top, left + side, top + side)).resize((crop_px, crop_px), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=95)
        crops.append(buffer.getvalue())
    return crops


def write_demo_shards(out_dir: str | os.PathLike, crop_px: int, train_crops: int, val_crops: int, seed: int) -> None:
    """Write train/val shards of photograph crops into ``out_dir`` (must not exist yet)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    samples: dict[str, list] = {"train": [], "val": []}
    for label, name in enumerate(DEMO_PHOTOS):
        photo = Image.fromarray(load_photo(name))
        for split, count, split_seed in (("train", train_crops, 0), ("val", val_crops, 1)):
            rng = random.Random(f"{seed}-{split_seed}-{label}")
            crops = random_crops(photo, count, crop_px, rng)
            samples[split].extend((f"{name}_{i:04d}", data, label) for i, data in enumerate(crops))
    random.Random(seed).shuffle(samples["train"])  # mix photographs across shards
    # validation cycles through the photographs, so the first batch (the image grids) shows all of them
    samples["val"].sort(key=lambda item: (int(item[0].rsplit("_", 1)[1]), item[2]))
    counts = {}
    for split, items in samples.items():
        writer = SplitWriter(out_dir, split, maxcount=256)
        for key, data, label in items:
            writer.write(key, "jpg", data, label)
        counts[split] = writer.close()
    write_index(out_dir, DEMO_PHOTOS, counts)


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the other writer is done
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_shards(root: str | os.PathLike, crop_px: int, train_crops: int, val_crops: int, seed: int) -> Path:
    """Write the demo shards into ``root`` unless a complete set is already there."""
    root = Path(root)
    if (root / INDEX_FILE).exists():
        return root
    with _exclusive_lock(root.parent / f".{root.name}.lock"):
        if (root / INDEX_FILE).exists():  # another process wrote it while we waited
            return root
        started = time.perf_counter()
        temporary = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        try:
            write_demo_shards(temporary, crop_px, train_crops, val_crops, seed)
            try:
                os.replace(temporary, root)  # atomic: readers see all shards or none
            except OSError:
                # A writer on another node (where the file lock does not reach) won the race.
                if not (root / INDEX_FILE).exists():
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        log.info("Wrote demo shards to %s in %.1f s.", root, time.perf_counter() - started)
    return root


class DemoDataModule(WebDatasetDataModule):
    """The default data: scikit-image photograph crops in cached shards (see module doc).

    Args:
        cache_dir: parent folder of the shard cache (``${paths.cache_dir}/demo_shards``).
        train_crops, val_crops: crops per photograph in each split.
        seed: seed of the crop positions (part of the cache folder name).
        Other arguments: as ``WebDatasetDataModule``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike = "~/.cache/tokbench/demo_shards",
        resolution: int = 64,
        batch_size: int = 8,
        num_workers: int = 2,
        train_crops: int = 64,
        val_crops: int = 8,
        seed: int = 0,
        **kwargs,
    ):
        self.crop_px = demo_crop_px(resolution)
        self.train_crops, self.val_crops, self.seed = train_crops, val_crops, seed
        name = f"v{DEMO_VERSION}-{self.crop_px}px-{train_crops}train-{val_crops}val-seed{seed}"
        self.cache_dir = Path(os.path.expanduser(str(cache_dir)))
        kwargs.setdefault("shuffle_buffer", 500)
        super().__init__(
            root=self.cache_dir / name, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
            train_shards="train-*.tar", val_shards="val-*.tar", **kwargs,
        )

    def prepare_data(self) -> None:
        ensure_demo_shards(self.root, self.crop_px, self.train_crops, self.val_crops, self.seed)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; needed where prepare_data was not called (non-zero local ranks, scripts)
        super().setup(stage)
