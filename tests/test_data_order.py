"""The training data order follows the seed: no process id or clock in it."""
import io
import random

import pytest
import torch
from PIL import Image

from data.shards import SplitWriter, write_index
from data.webdataset_module import WebDatasetDataModule


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("order_shards")
    writer = SplitWriter(root, "train", maxcount=8)
    for i in range(32):  # the label is the sample's index: the order is readable from the labels
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (i * 7 % 256, 50, 200)).save(buffer, format="PNG")
        writer.write(f"img{i:03d}", "png", buffer.getvalue(), i)
    write_index(root, [str(i) for i in range(32)], {"train": writer.close()})
    return root


def _order(root, seed, workers=0, rank=0, world_size=1, epochs=2, buffer=8):
    random.seed(1234)  # the crop / flip randomness, as seed_everything would set it
    dm = WebDatasetDataModule(root, val_shards=None, resolution=8, batch_size=4, num_workers=workers,
                              train_batches_per_epoch=5, shuffle_buffer=buffer, shuffle_seed=seed,
                              rank=rank, world_size=world_size, pin_memory=False)
    loader = dm.train_dataloader()
    return [labels.tolist() for _ in range(epochs) for _, labels in loader]


def test_same_seed_same_order(shard_root):
    assert _order(shard_root, seed=3) == _order(shard_root, seed=3)


def test_another_seed_another_order(shard_root):
    assert _order(shard_root, seed=3) != _order(shard_root, seed=4)


def test_the_seed_draws_the_shards(shard_root):
    # a one-sample buffer keeps the stream's order: what differs is which shards were drawn
    assert _order(shard_root, seed=3, buffer=1) != _order(shard_root, seed=4, buffer=1)


def test_same_seed_same_order_with_workers(shard_root):
    first = _order(shard_root, seed=3, workers=2, epochs=1)
    assert first == _order(shard_root, seed=3, workers=2, epochs=1)


def test_ranks_draw_different_streams_from_one_seed(shard_root):
    rank0 = _order(shard_root, seed=3, rank=0, world_size=2)
    rank1 = _order(shard_root, seed=3, rank=1, world_size=2)
    assert not set(sum(rank0, [])) & set(sum(rank1, []))  # disjoint shards per rank


@pytest.mark.parametrize("data", ["demo", "imagenet", "imagefolder"])
def test_the_run_seed_reaches_the_data_order(data):
    from hydra import compose, initialize_config_dir

    from helpers import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}", "seed=7"])
    key = "seed" if data == "imagefolder" else "shuffle_seed"
    assert cfg.data[key] == 7
