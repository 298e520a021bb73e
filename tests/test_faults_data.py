"""Fault table (docs/faults.md), data rows: odd and broken images, broken shards, an empty
root, fewer shards than ranks x workers, every shard unreadable. Each ends in handled
images, counted skips, or one clear error; never a hang (the timeouts below turn a hang
into a failure)."""
from __future__ import annotations

import io
import logging
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from data.common import DataUnreadableError, SkipCounter
from data.shards import SplitWriter, write_index
from data.transforms import EvalTransform, TrainTransform, decode_image, limit_aspect
from data.webdataset_module import DecodeSamples, WebDatasetDataModule


def encoded(mode: str, size=(24, 20), fmt="PNG", value=None) -> bytes:
    """An image of PIL ``mode`` whose pixels are ``value`` (or random)."""
    rng = np.random.default_rng(0)
    if value is not None:
        image = Image.new(mode, size, value)
    else:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample(key: str, image: bytes | None, label: int = 0, ext: str = "png") -> dict:
    s = {"__key__": key, "__url__": "shard.tar", "cls": str(label).encode()}
    if image is not None:
        s[ext] = image
    return s


# ----------------------------------------------------------------------------- odd images


def test_odd_images_are_converted_and_broken_ones_are_skipped_counted_and_named(caplog):
    samples = [
        sample("gray", encoded("L", value=200), 1),
        sample("cmyk", encoded("CMYK", fmt="JPEG", value=(0, 0, 0, 0)), 2, "jpg"),  # no ink: white
        sample("alpha", encoded("RGBA", value=(10, 20, 30, 0)), 3),  # fully transparent: colour kept
        sample("palette", encoded("P", value=5), 4),
        sample("tiny", encoded("RGB", size=(1, 1), value=(255, 0, 0)), 5),
        sample("strip", encoded("RGB", size=(2, 4000), value=(0, 255, 0)), 6),
        sample("zero_bytes", b"", 7),
        sample("garbage", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, 8),
        sample("truncated", encoded("RGB", size=(64, 64), fmt="JPEG")[:200], 9, "jpg"),
        sample("no_image", None, 10),
        sample("bad_label", encoded("RGB"), 0) | {"cls": b"cat"},
    ]
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="data.common"):
        out = list(DecodeSamples(EvalTransform(16), skips)(iter(samples)))
    labels = [label for _, label in out]
    assert labels == [1, 2, 3, 4, 5, 6]
    assert all(image.shape == (3, 16, 16) and torch.isfinite(image).all() for image, _ in out)
    to_255 = lambda image: ((image + 1) * 127.5).round()  # noqa: E731
    gray, cmyk, alpha, _, tiny, strip = (to_255(image) for image, _ in out)
    assert (gray == 200).all() and (cmyk == 255).all() and (tiny[0] == 255).all() and (tiny[1:] == 0).all()
    assert torch.equal(alpha[:, 0, 0], torch.tensor([10.0, 20.0, 30.0])) and (strip[1] == 255).all()
    assert skips.total == 5
    assert "zero_bytes" in caplog.text and "garbage" in caplog.text  # the first skips are named


def test_an_extreme_aspect_image_is_cropped_before_resizing_not_blown_up():
    strip = Image.new("RGB", (1, 20000), (0, 0, 255))
    assert limit_aspect(strip).size == (1, 8)
    started = time.perf_counter()
    image = TrainTransform(256)(decode_image(encoded("RGB", size=(1, 20000), value=(0, 0, 255))))
    assert image.shape == (3, 256, 256) and time.perf_counter() - started < 5  # uncropped: a 256 x 5.1M image
    assert limit_aspect(Image.new("RGB", (500, 375))).size == (500, 375)  # photographs untouched


# ----------------------------------------------------------------------------- broken shards


def write_shard(path, labels, image=None) -> None:
    writer = SplitWriter(path.parent, "tmp", maxcount=10**6)
    for label in labels:
        writer.write(f"s{label:04d}", "png", image or encoded("RGB", value=(label, label, label)), label)
    writer.close()
    (path.parent / "tmp-000000.tar").rename(path)


def truncate(path, keep: float = 0.6) -> set[int]:
    """Cuts the shard's tail off; returns the labels of the samples whose files are all intact."""
    data = path.read_bytes()
    length = int(len(data) * keep)
    files: dict[str, list[bool]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            files.setdefault(member.name.split(".")[0], []).append(member.offset_data + member.size <= length)
    path.write_bytes(data[:length])
    return {int(key[1:]) for key, intact in files.items() if len(intact) == 2 and all(intact)}


@pytest.mark.timeout(60)
def test_training_reads_past_a_truncated_shard_and_a_file_that_is_not_a_tar(tmp_path):
    write_shard(tmp_path / "train-000000.tar", range(0, 8))
    write_shard(tmp_path / "train-000001.tar", range(100, 108))
    intact = truncate(tmp_path / "train-000001.tar")  # its first samples read, then the tar ends
    assert 0 < len(intact) < 8
    (tmp_path / "train-000002.tar").write_text("this is not a tar file\n" * 100)
    dm = WebDatasetDataModule(tmp_path, val_shards=None, resolution=16, batch_size=4, num_workers=0,
                              train_batches_per_epoch=12, shuffle_buffer=4, rank=0, world_size=1)
    labels = [label for _, batch in dm.train_dataloader() for label in batch.tolist()]
    assert len(labels) == 48
    assert set(labels) <= set(range(0, 8)) | intact  # only samples that exist intact
    assert dm.skipped_samples() >= 1


def test_an_unreadable_validation_shard_is_counted_and_padded_not_fatal(tmp_path):
    write_shard(tmp_path / "val-000000.tar", range(0, 4))
    write_shard(tmp_path / "val-000001.tar", range(4, 8))
    write_index(tmp_path, ["c"], {"val": {"val-000000.tar": 4, "val-000001.tar": 4}})
    (tmp_path / "val-000001.tar").write_bytes(b"")  # emptied after it was indexed
    dm = WebDatasetDataModule(tmp_path, resolution=16, batch_size=4, num_workers=0, rank=0, world_size=1)
    labels = [label for _, batch in dm.val_dataloader() for label in batch.tolist()]
    assert sorted(labels) == [-1, -1, -1, -1, 0, 1, 2, 3]  # the same batch count; padding marked -1
    assert dm.skipped_samples() >= 1


def test_an_empty_root_is_one_clear_error_before_training(tmp_path):
    dm = WebDatasetDataModule(tmp_path, resolution=16, batch_size=2, rank=0, world_size=1)
    with pytest.raises(FileNotFoundError, match="No shards matched .* Fix: write shards"):
        dm.setup("fit")


@pytest.mark.timeout(120)
def test_fewer_shards_than_ranks_times_workers_still_fills_every_rank(tmp_path):
    write_shard(tmp_path / "train-000000.tar", range(8))
    for rank in (0, 1):  # 1 shard for 2 ranks x 2 workers
        dm = WebDatasetDataModule(tmp_path, val_shards=None, resolution=16, batch_size=2, num_workers=2,
                                  train_batches_per_epoch=3, shuffle_buffer=2, rank=rank, world_size=2)
        batches = list(dm.train_dataloader())
        assert len(batches) == 3 and all(images.shape == (2, 3, 16, 16) for images, _ in batches)


# ----------------------------------------------------------------------------- nothing readable


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broken", ["not_tars", "garbage_images"])
@pytest.mark.parametrize("workers", [0, 2])
def test_when_no_training_sample_can_be_read_the_run_stops_with_a_clear_error(tmp_path, broken, workers):
    for i in range(3):
        shard = tmp_path / f"train-{i:06d}.tar"
        if broken == "not_tars":
            shard.write_bytes(b"\0" * 1000 if i else b"")
        else:
            write_shard(shard, range(4), image=b"not an image")
    dm = WebDatasetDataModule(tmp_path, val_shards=None, resolution=16, batch_size=2, num_workers=workers,
                              train_batches_per_epoch=5, shuffle_buffer=2, rank=0, world_size=1,
                              max_consecutive_failures=50)
    loader = dm.train_dataloader()
    try:
        with pytest.raises(DataUnreadableError if workers == 0 else Exception, match="in a row could not be read"):
            next(iter(loader))
    finally:  # stop the persistent workers here, not whenever a later test's garbage collection does
        workers_iterator = getattr(loader.pipeline[0], "_iterator", None)
        if workers_iterator is not None:
            workers_iterator._shutdown_workers()


def test_good_samples_between_bad_ones_reset_the_failure_streak():
    good, bad = sample("good", encoded("RGB")), sample("bad", b"")
    skips = SkipCounter(max_consecutive=2)
    out = list(DecodeSamples(EvalTransform(16), skips)(iter([bad, good, bad, good, bad, good])))
    assert len(out) == 3 and skips.total == 3  # never two failures in a row: no error
    with pytest.raises(DataUnreadableError, match="2 samples or shards in a row"):
        list(DecodeSamples(EvalTransform(16), SkipCounter(max_consecutive=2))(iter([good, bad, bad, good])))
