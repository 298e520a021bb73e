"""Image decoding and the two transforms every datamodule shares.

Training (SPEC section 1): resize the short side to a random integer size in
[R, max_upscale * R] (LlamaGen: [256, 320] at 256 px, i.e. 1.25), take a random R x R
crop, flip horizontally with probability 0.5.
Evaluation: resize the short side to R, take the centre R x R crop.

Resizing is PIL bicubic, which low-pass filters when shrinking (no aliasing).
Randomness comes from Python's ``random`` module, which the DataLoader seeds
differently in every worker.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image

from data.common import check_resolution


def decode_image(data: bytes, min_short_side: int | None = None) -> Image.Image:
    """Encoded image bytes (JPEG, PNG, WebP, ...) -> fully decoded RGB PIL image.

    ``convert`` forces the whole file to be decoded here, so truncated or corrupt data
    raises now (and is counted by the caller) rather than later in a transform.

    ``min_short_side``: the caller only needs an image whose short side is at least this;
    a JPEG at least twice that size is then decoded at 1/2, 1/4 or 1/8 scale in the DCT
    domain (PIL's draft mode), never below ``min_short_side``, which is several times
    cheaper than a full decode followed by a shrinking resize.
    """
    with Image.open(io.BytesIO(data)) as image:
        if min_short_side and image.format == "JPEG":
            width, height = image.size
            scale = min_short_side / min(width, height)
            if scale <= 0.5:
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        return image.convert("RGB")


MAX_ASPECT = 8.0
"""Longest side / shortest side kept before resizing; a longer side is centre-cropped first.
Without it a 1 x 20000 px strip upscaled to a 256 px short side would be a 256 x 5.1M image
(about 4 GB) for one sample. Photographs (ImageNet: at most about 1:5) are never cropped."""


def limit_aspect(image: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    width, height = image.size
    longest = max(1, math.floor(min(width, height) * max_aspect))
    if max(width, height) <= longest:
        return image
    if width > height:
        left = (width - longest) // 2
        return image.crop((left, 0, left + longest, height))
    top = (height - longest) // 2
    return image.crop((0, top, width, top + longest))


def short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side set exactly to ``size``; rounding only touches the long side."""
    scale = size / min(width, height)
    return (size, max(size, round(height * scale))) if width <= height else (max(size, round(width * scale)), size)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    image = limit_aspect(image)
    new_size = short_side_size(*image.size, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BICUBIC)


def resized_window(image: Image.Image, new_size: tuple[int, int], left: int, top: int, size: int) -> Image.Image:
    """The ``size`` x ``size`` window at (left, top) of ``image`` resized to ``new_size``.

    Only the window is resampled (PIL's ``box``: the filter still reads the source pixels
    around it), which equals resizing the whole image and cropping to within 1/255 and
    costs what the output costs: at 256 px from a 500 x 375 photo, 1.6x less than
    resizing the whole image first."""
    width, height = image.size
    if new_size == (width, height):
        return image.crop((left, top, left + size, top + size))
    sx, sy = width / new_size[0], height / new_size[1]
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class TrainTransform:
    """Random short-side resize in [R, max_upscale * R], random R x R crop, random flip."""

    def __init__(self, resolution: int, max_upscale: float = 1.25, flip: bool = True, jpeg_draft: bool = True):
        if max_upscale < 1.0:
            raise ValueError(f"max_upscale must be >= 1 (the crop needs a short side >= resolution), got {max_upscale}.")
        self.resolution = check_resolution(resolution)
        self.max_short_side = max(self.resolution, int(max_upscale * self.resolution))
        self.flip = flip
        # JPEGs may be decoded at reduced size as long as the short side stays >= the largest resize
        self.decode_short_side = self.max_short_side if jpeg_draft else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.resolution
        image = limit_aspect(image)
        new_size = short_side_size(*image.size, random.randint(size, self.max_short_side))
        left = random.randint(0, new_size[0] - size)
        top = random.randint(0, new_size[1] - size)
        image = resized_window(image, new_size, left, top, size)
        if self.flip and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)


class EvalTransform:
    """Short side to R, centre R x R crop: deterministic."""

    def __init__(self, resolution: int):
        self.resolution = check_resolution(resolution)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.resolution
        image = resize_short_side(image, size)
        width, height = image.size
        left = (width - size) // 2
        top = (height - size) // 2
        return to_tensor(image.crop((left, top, left + size, top + size)))
