"""webdataset datamodule for ImageNet-style shards (``<key>.jpg|png|webp`` + ``<key>.cls``).

Training: every rank takes its own shards (every world_size-th) and draws from them
with replacement (``resampled=True``), so ranks see disjoint samples, every rank and
every worker has an endless stream and none can run dry; a shuffle buffer mixes
samples across shards; the loader stops after exactly ``train_batches_per_epoch``
batches on every rank (``with_epoch``), which keeps the ranks in step.

Validation: every sample is read exactly once per rank split (``data.common``): the
samples of the validation shards are numbered in shard order, rank r reads its
contiguous range, its workers share that range, and the main process re-batches so
that every rank yields the same number of batches.

Rank and world size are read once in the main process (from the trainer, else
torch.distributed) and given to the pipeline explicitly, rather than letting every
DataLoader worker guess them from the environment: Lightning's DDP launcher sets
WORLD_SIZE but not RANK, and a worker started with ``spawn`` would see no process
group at all, i.e. silently read everything as rank 0.
"""

from __future__ import annotations

import logging
import math
import os
import random
from itertools import islice
from typing import Iterator, Sequence

import pytorch_lightning as pl
import torch
import webdataset as wds

from data.common import (
    PADDING_LABEL,
    RankSplit,
    SkipCounter,
    check_resolution,
    collate,
    resolve_rank,
    split_for_rank,
)
from data.shards import NoShardsMatched, expand_shards, read_index, shard_sample_counts
from data.transforms import EvalTransform, TrainTransform, decode_image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class NodeSplitter:
    """Keeps every ``world_size``-th item of the shard stream starting at ``rank``:
    the same rule as ``wds.split_by_node``, with the rank fixed when the loader is built."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, source: Iterator) -> Iterator:
        yield from islice(source, self.rank, None, self.world_size)


def worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class SeededShuffle:
    """Pipeline stage: webdataset's shuffle buffer with its random generator seeded from
    (seed, rank, DataLoader worker, pass) instead of webdataset's default of process id
    and clock, so the same seed gives the same data order run to run."""

    def __init__(self, bufsize: int, initial: int, seed: int, rank: int):
        self.bufsize, self.initial, self.seed, self.rank = bufsize, initial, seed, rank
        self.passes = 0  # per worker process: each epoch's iterator gets its own stream

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(f"shuffle-{self.seed}-{self.rank}-{worker_id()}-{self.passes}")
        self.passes += 1
        yield from wds.shuffle(self.bufsize, self.initial, rng=rng)(samples)


class DecodeSamples:
    """Pipeline stage: raw webdataset samples -> (image tensor, label).

    A sample without an image, without a readable ``cls``, or whose image fails to
    decode is skipped and recorded in ``skips`` with its shard and key.
    """

    def __init__(self, transform, skips: SkipCounter):
        self.transform, self.skips = transform, skips

    def __call__(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int]]:
        for sample in samples:
            key = f"{sample.get('__url__')}:{sample.get('__key__')}"
            try:
                image_key = next((k for k in IMAGE_KEYS if k in sample), None)
                if image_key is None:
                    raise ValueError(f"no image file ({'/'.join(IMAGE_KEYS)}) in sample with {sorted(sample)}")
                if "cls" not in sample:
                    raise ValueError("no .cls label file in sample")
                label = int(sample["cls"])
                image = self.transform(decode_image(sample[image_key], getattr(self.transform, "decode_short_side", None)))
            except Exception as exn:
                self.skips.record(key, exn)
                continue
            self.skips.success()
            yield image, label


class Segments(torch.utils.data.IterableDataset):
    """First pipeline stage: yields the planned shard segments (a bare list would be
    spliced into the pipeline's stages by ``wds.DataPipeline``)."""

    def __init__(self, segments: Sequence[dict]):
        super().__init__()
        self.segments = list(segments)

    def __iter__(self) -> Iterator[dict]:
        yield from (dict(segment) for segment in self.segments)


class ReadSegments:
    """Pipeline stage: ``{"url", "start", "stop"}`` -> the raw samples start..stop-1 of that shard."""

    def __init__(self, handler):
        self.handler = handler

    def __call__(self, segments: Iterator[dict]) -> Iterator[dict]:
        for segment in segments:
            samples = wds.tarfile_samples([{"url": segment["url"]}], handler=self.handler)
            yield from islice(samples, segment["start"], segment["stop"])


def plan_segments(
    shards: Sequence[str], counts: Sequence[int], start: int, stop: int, pieces: int = 1
) -> list[dict]:
    """The global sample range [start, stop) (shards in order) as per-shard segments,
    cut into pieces of at most ceil((stop - start) / pieces) samples so that
    ``pieces`` DataLoader workers get about equal work."""
    piece = max(1, math.ceil((stop - start) / max(1, pieces)))
    segments, offset = [], 0
    for url, count in zip(shards, counts):
        begin, end = max(start, offset), min(stop, offset + count)
        for first in range(begin, end, piece):
            segments.append({"url": url, "start": first - offset, "stop": min(end, first + piece) - offset})
        offset += count
    return segments


class FixedCountBatches:
    """Main-process re-batching: takes exactly ``real`` samples from ``loader`` (batches
    of any size, from any worker) and yields ``ceil(total / batch_size)`` batches of
    ``batch_size`` (the last may be smaller), filled up with padding samples (label
    ``PADDING_LABEL``, zero image) from ``real`` to ``total``. Every rank thus yields the
    same number of batches, even when some of its samples were unreadable."""

    def __init__(self, loader, real: int, total: int, batch_size: int, resolution: int, pin_memory: bool = False):
        self.loader, self.real, self.total = loader, real, total
        self.batch_size, self.resolution, self.pin_memory = batch_size, resolution, pin_memory

    def __len__(self) -> int:
        return math.ceil(self.total / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._batches():
            yield (images.pin_memory(), labels.pin_memory()) if self.pin_memory else (images, labels)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.resolution
        images, labels = torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.int64)
        received = 0
        if self.real > 0:
            for batch_images, batch_labels in self.loader:
                take = min(len(batch_labels), self.real - received)
                images = torch.cat([images, batch_images[:take]])
                labels = torch.cat([labels, batch_labels[:take]])
                received += take
                while len(labels) >= self.batch_size:
                    yield images[: self.batch_size], labels[: self.batch_size]
                    images, labels = images[self.batch_size :], labels[self.batch_size :]
                if received >= self.real:
                    break
        if received < self.real:
            log.warning(
                "This rank read %d of its %d validation samples (the others were unreadable and are counted "
                "in skipped_samples()); padding with label %d to keep ranks in step.",
                received, self.real, PADDING_LABEL,
            )
        missing = self.total - received
        if missing:
            images = torch.cat([images, torch.zeros(missing, 3, size, size)])
            labels = torch.cat([labels, torch.full((missing,), PADDING_LABEL, dtype=torch.int64)])
        for first in range(0, len(labels), self.batch_size):
            yield images[first : first + self.batch_size], labels[first : first + self.batch_size]


class WebDatasetDataModule(pl.LightningDataModule):
    """ImageNet-style webdataset shards -> (images in [-1, 1] (B, 3, R, R), labels (B,)).

    Args:
        root: folder of the shards (and of ``shards.json`` / ``classes.json`` when
            written by ``python -m data.shards``); relative shard patterns are under it.
        train_shards, val_shards: brace patterns, globs or lists (see ``expand_shards``);
            ``val_shards=None``: no validation.
        resolution: output side R in pixels.
        batch_size: per-rank batch size (training and validation unless ``val_batch_size``).
        num_workers: DataLoader worker processes per rank.
        train_batches_per_epoch: batches per rank per epoch; None derives
            floor(train samples / (batch_size * world_size)) from ``shards.json``.
        shuffle_buffer: samples held by each worker's shuffle buffer (raw bytes).
        shuffle_seed: seed of the training data order (shard resampling and shuffle
            buffer, combined with rank and worker); the configs pass the run's ``seed``.
        max_upscale: training short side is drawn from [R, max_upscale * R].
        val_remainder: "drop" or "pad" (see ``data.common``).
        pin_memory: page-locked batches for fast host-to-GPU copies (default: when CUDA is present).
        jpeg_draft: decode training JPEGs at reduced size (DCT scaling) when they are at
            least twice the largest resize (``data.transforms.decode_image``).
        prefetch_factor: batches each worker prepares ahead of the training step.
        rank, world_size: override the rank of this process (tests, custom launchers).
        max_consecutive_failures: unreadable shards / samples in a row (per worker) after
            which reading stops with an error instead of retrying forever.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train_shards: str | Sequence[str] = "train-*.tar",
        val_shards: str | Sequence[str] | None = "val-*.tar",
        resolution: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        train_batches_per_epoch: int | None = None,
        shuffle_buffer: int = 2000,
        shuffle_seed: int = 0,
        max_upscale: float = 1.25,
        flip: bool = True,
        val_batch_size: int | None = None,
        val_remainder: str = "drop",
        pin_memory: bool | None = None,
        jpeg_draft: bool = True,
        prefetch_factor: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        max_consecutive_failures: int = 1000,
    ):
        super().__init__()
        self.root = os.path.expanduser(str(root))
        self.train_shards, self.val_shards = train_shards, val_shards
        self.resolution = check_resolution(resolution)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.train_batches_per_epoch = train_batches_per_epoch
        self.shuffle_buffer = int(shuffle_buffer)
        self.shuffle_seed = int(shuffle_seed)
        self.train_transform = TrainTransform(resolution, max_upscale=max_upscale, flip=flip, jpeg_draft=jpeg_draft)
        self.prefetch_factor = int(prefetch_factor)
        self.eval_transform = EvalTransform(resolution)
        split_for_rank(1, 0, 1, val_remainder)  # validates the policy name now, not at the first epoch
        self.val_remainder = val_remainder
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._rank, self._world_size = rank, world_size
        self.skips = SkipCounter(max_consecutive=max_consecutive_failures)
        self.val_split: RankSplit | None = None
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None
        self._val_counts: list[int] | None = None
        self._val_spec = None

    # ---------------------------------------------------------------- facts

    def skipped_samples(self) -> int:
        """Samples skipped as unreadable so far in this process (all its workers)."""
        return self.skips.total

    @property
    def num_classes(self) -> int | None:
        return read_index(self.root).get("num_classes")

    def rank_and_world_size(self) -> tuple[int, int]:
        return resolve_rank(self.trainer, self._rank, self._world_size)

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self._train_urls is None:
            self._train_urls = expand_shards(self.root, self.train_shards)
        wants_val = stage in (None, "fit", "validate") and self.val_shards is not None
        if wants_val and (self._val_urls is None or self._val_spec != self.val_shards):
            try:
                self._val_urls = expand_shards(self.root, self.val_shards)
            except NoShardsMatched:
                if stage == "validate":
                    raise
                self._val_urls = []  # train anyway: validation is a measurement, not a requirement
                if self.rank_and_world_size()[0] == 0:
                    log.warning(
                        "No validation shards match data.val_shards=%r under %s: training runs WITHOUT validation "
                        "(no val/ metrics or val images). Fix: `python -m data.shards SRC OUT` holds out a "
                        "validation split by itself; data.val_shards=null silences this.", self.val_shards, self.root)
            self._val_counts = shard_sample_counts(self._val_urls, self.root)
            self._val_spec = self.val_shards  # re-resolved if someone points val_shards elsewhere

    def batches_per_epoch(self) -> int:
        if self.train_batches_per_epoch is not None:
            if int(self.train_batches_per_epoch) < 1:
                raise ValueError(f"train_batches_per_epoch must be >= 1, got {self.train_batches_per_epoch}.")
            return int(self.train_batches_per_epoch)
        train = read_index(self.root).get("splits", {}).get("train")
        if not train:
            raise ValueError(
                f"data.train_batches_per_epoch is null and {self.root} has no shards.json listing the training "
                "samples. Fix: set data.train_batches_per_epoch (per rank), e.g. "
                "train_samples // (batch_size * world_size)."
            )
        _, world_size = self.rank_and_world_size()
        return max(1, train["samples"] // (self.batch_size * world_size))

    def train_dataloader(self):
        if self._train_urls is None:
            self.setup("fit")
        rank, world_size = self.rank_and_world_size()
        batches = self.batches_per_epoch()
        urls, nodesplitter = self._train_urls, NodeSplitter(rank, world_size)
        if len(urls) >= world_size:
            # Each rank resamples only its own shards (every world_size-th): ranks never
            # read the same sample, and no rank can run dry.
            urls, nodesplitter = urls[rank::world_size], None
        elif rank == 0:
            log.warning("Only %d training shards for %d ranks: ranks resample the same shards and may see "
                        "the same samples. Write more shards (python -m data.shards --maxcount ...).",
                        len(urls), world_size)
        log.info("Training shards for rank %d/%d: %s", rank, world_size,
                 ", ".join(os.path.basename(str(u)) for u in urls) if nodesplitter is None else "all (shared)")
        # Shards drawn with replacement, then a shuffle buffer: both seeded from
        # (shuffle_seed, rank, worker), never from the clock (webdataset's default).
        shard_seed = wds.utils.make_seed(self.shuffle_seed, rank)
        stages = [wds.ResampledShards(urls, seed=shard_seed, worker_seed=worker_id, deterministic=True)]
        if nodesplitter is not None:
            stages.append(nodesplitter)
        stages += [
            wds.tarfile_to_samples(handler=self.skips.handler),
            SeededShuffle(self.shuffle_buffer, max(1, self.shuffle_buffer // 4), self.shuffle_seed, rank),
            DecodeSamples(self.train_transform, self.skips),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
        ]
        dataset = wds.DataPipeline(*stages)
        loader = wds.WebLoader(
            dataset,
            batch_size=None,  # batched inside the workers
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,  # batches ready per worker
        )
        # The stream is endless; with_epoch cuts it to the same count on every rank.
        # That count is exact, so it is also given as __len__ for progress bars and
        # fractional val_check_interval.
        return loader.with_epoch(nbatches=batches).with_length(batches, silent=True)

    def val_dataloader(self) -> FixedCountBatches | list:
        if self.val_shards is None:
            return []  # no validation split configured: Lightning skips validation
        if self._val_urls is None or self._val_spec != self.val_shards:
            self.setup("validate")  # strict: validating alone without validation shards is an error
        if not self._val_urls:
            return []  # no validation shards (warned in setup)
        rank, world_size = self.rank_and_world_size()
        self.val_split = split = split_for_rank(sum(self._val_counts), rank, world_size, self.val_remainder)
        if split.dropped and rank == 0:
            log.info(
                "Validation: %d samples over %d ranks; the last %d are not evaluated (val_remainder=drop).",
                split.total, world_size, split.dropped,
            )
        segments = plan_segments(self._val_urls, self._val_counts, split.start, split.stop, self.num_workers)
        pipeline = wds.DataPipeline(
            Segments(segments),
            wds.split_by_worker,
            ReadSegments(self.skips.handler),
            DecodeSamples(self.eval_transform, self.skips),
            wds.batched(self.val_batch_size, collation_fn=collate, partial=True),
        )
        workers = min(self.num_workers, len(segments))
        # Not pinned here: FixedCountBatches re-batches (copies) and pins its own output.
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
        return FixedCountBatches(
            loader, split.stop - split.start, split.per_rank, self.val_batch_size, self.resolution, self.pin_memory
        )
