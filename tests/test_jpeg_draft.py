"""Reduced-size JPEG decoding (PIL draft mode) for training crops."""
import io

import numpy as np
import pytest
from PIL import Image

from data.transforms import decode_image, resize_short_side


def jpeg_bytes(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    # smooth content (a photo-like gradient plus mild noise) so resampling differences are small
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_draft_decodes_a_large_jpeg_smaller_but_never_below_the_needed_side():
    data = jpeg_bytes(640, 480)
    full = decode_image(data)
    draft = decode_image(data, min_short_side=100)
    assert full.size == (640, 480)
    assert draft.size == (160, 120)  # 1/4 scale: the smallest with a short side >= 100
    assert min(decode_image(data, min_short_side=200).size) >= 200


def test_draft_leaves_images_that_are_not_twice_the_needed_side_alone():
    data = jpeg_bytes(640, 480)
    assert decode_image(data, min_short_side=300).size == (640, 480)


def test_draft_then_resize_matches_the_full_decode_then_resize():
    data = jpeg_bytes(640, 480)
    full = np.asarray(resize_short_side(decode_image(data), 96), dtype=np.float64)
    draft = np.asarray(resize_short_side(decode_image(data, min_short_side=96), 96), dtype=np.float64)
    assert full.shape == draft.shape
    psnr = 10 * np.log10(255**2 / np.mean((full - draft) ** 2))
    assert psnr > 35, psnr
