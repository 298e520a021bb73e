"""The splits the evaluator and the generator's token cache read from any datamodule of ``data/``.

The validation loader of a datamodule built with ``val_remainder="pad"`` gives each
image to exactly one rank (``data.common``); padding rows carry ``PADDING_LABEL`` and are
dropped by ``real_images``.

The latent generator needs the *training* split once, in a fixed order, with the
evaluation transform (centre crop, no flip): ``training_split_once`` points a
datamodule's validation pipeline at its training data.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import torch
from torch import Tensor



def real_images(batch) -> Tensor:
    """Images of a validation batch without the padding rows (label ``PADDING_LABEL``) that
    the datamodules add so that every rank gets the same number of batches."""
    from data.common import PADDING_LABEL

    if not isinstance(batch, (list, tuple)):
        return batch
    images, labels = batch[0], batch[1]
    keep = labels != PADDING_LABEL
    return images if bool(keep.all()) else images[keep.to(images.device)]


def check_counts_every_image(datamodule) -> None:
    if getattr(datamodule, "val_remainder", "pad") != "pad":
        raise ValueError(
            f"data.val_remainder={datamodule.val_remainder!r} drops the last images of the split under DDP. "
            "Fix: evaluate with data.val_remainder=pad (conf/evaluate/evaluate.yaml sets it)."
        )


def validation_batches(datamodule, limit_batches: int | None = None) -> Iterable:
    """This rank's validation batches (the first ``limit_batches`` per rank when set)."""
    check_counts_every_image(datamodule)
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    return loader if limit_batches is None else itertools.islice(loader, int(limit_batches))


def training_split_once(datamodule, limit_batches: int | None = None) -> Iterable:
    """Every training image once (across ranks), fixed order, evaluation transform."""
    check_counts_every_image(datamodule)
    if hasattr(datamodule, "train_shards") and hasattr(datamodule, "val_shards"):
        # webdataset: the validation pipeline reads shards in order, split by rank
        datamodule.val_shards = datamodule.train_shards
        datamodule.setup("validate")
    else:
        datamodule.setup("fit")
        if getattr(datamodule, "train_set", None) is None:
            raise TypeError(
                f"{type(datamodule).__name__} exposes neither train_set (map-style) nor train_shards "
                "(webdataset); the generator cannot read its training split once."
            )
        datamodule.val_set = datamodule.train_set
    loader = datamodule.val_dataloader()
    return loader if limit_batches is None else itertools.islice(loader, int(limit_batches))


def first_images(batches: Iterable, count: int) -> Tensor:
    """The first ``count`` real images of an iterable of batches (for the reconstruction grid)."""
    taken: list[Tensor] = []
    have = 0
    for batch in batches:
        images = real_images(batch)
        taken.append(images[: count - have].cpu())
        have += taken[-1].shape[0]
        if have >= count:
            break
    if not taken:
        raise RuntimeError("no validation images to show in the reconstruction grid")
    return torch.cat(taken)[:count]


def labelled(batches: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) of real rows only."""
    from data.common import PADDING_LABEL

    for images, labels in batches:
        keep = labels != PADDING_LABEL
        if bool(keep.any()):
            yield images[keep], labels[keep]
