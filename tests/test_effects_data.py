"""Data claims checked on the samples actually yielded: ranks train on disjoint samples
from their own shards (whatever the log line says), validation hands every sample to
exactly one rank, the training transform crops (not resizes) and flips."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from data.transforms import TrainTransform, to_tensor
from data.webdataset_module import WebDatasetDataModule
from test_data import labels_seen, write_indexed_shards


def _train_labels(root, rank, world_size, num_workers=2, batches=6):
    dm = WebDatasetDataModule(root, val_shards=None, resolution=16, batch_size=4, num_workers=num_workers,
                              train_batches_per_epoch=batches, shuffle_buffer=8, rank=rank, world_size=world_size)
    return labels_seen(dm.train_dataloader())


def test_training_ranks_read_disjoint_samples_only_from_their_own_shards(tmp_path):
    # 4 shards of 6 samples; sample i has label i, so labels name the samples a rank read
    write_indexed_shards(tmp_path, "train", count=24, maxcount=6)
    shard_of = {i: i // 6 for i in range(24)}
    seen = [set(_train_labels(tmp_path, rank, 2)) for rank in range(2)]
    assert not seen[0] & seen[1]
    assert {shard_of[i] for i in seen[0]} <= {0, 2} and {shard_of[i] for i in seen[1]} <= {1, 3}
    assert seen[0] and seen[1]


def _exact_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels), to_tensor(Image.fromarray(pixels))


def test_training_crops_are_windows_of_the_image_at_varying_offsets():
    image, full = _exact_image(24, 16)
    transform = TrainTransform(16, max_upscale=1.0, flip=False)  # short side already 16: crop only
    offsets = set()
    for _ in range(30):
        out = transform(image)
        matches = [left for left in range(9) if torch.equal(out, full[:, :, left : left + 16])]
        assert matches, "the crop is not a window of the image"
        offsets.add(matches[0])
    assert len(offsets) >= 3


def test_training_flip_mirrors_about_half_the_crops_and_flip_false_never():
    image, full = _exact_image(16, 16)
    mirrored = torch.flip(full, dims=[2])
    flips = [torch.equal(TrainTransform(16, max_upscale=1.0)(image), mirrored) for _ in range(60)]
    assert 10 <= sum(flips) <= 50
    outs = [TrainTransform(16, max_upscale=1.0, flip=False)(image) for _ in range(20)]
    assert all(torch.equal(out, full) for out in outs)


def test_the_rank_comes_from_the_trainer_when_not_given(tmp_path):
    """Under DDP the datamodule is given no rank: it reads the trainer's, and rank 1 of 2
    then reads only its own shards."""
    from types import SimpleNamespace

    write_indexed_shards(tmp_path, "train", count=24, maxcount=6)
    dm = WebDatasetDataModule(tmp_path, val_shards=None, resolution=16, batch_size=4, num_workers=0,
                              train_batches_per_epoch=4, shuffle_buffer=8)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    assert dm.rank_and_world_size() == (1, 2)
    assert {i // 6 for i in labels_seen(dm.train_dataloader())} <= {1, 3}


def test_a_resized_training_crop_equals_the_window_of_the_resized_image():
    from PIL import Image as PILImage

    from data.transforms import resized_window

    image, _ = _exact_image(50, 37, seed=3)
    resized = image.resize((86, 64), PILImage.Resampling.BICUBIC)  # short side 37 -> 64
    for left, top in ((0, 0), (22, 0), (9, 0)):
        window = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=int)
        fast = np.asarray(resized_window(image, (86, 64), left, top, 64), dtype=int)
        assert np.abs(fast - window).max() <= 1  # rounding only
    # the window moves with the offset: not a resize of the whole image
    assert not np.array_equal(np.asarray(resized_window(image, (86, 64), 0, 0, 64)),
                              np.asarray(resized_window(image, (86, 64), 22, 0, 64)))
