"""Data pipeline: shard round trip, rank x worker splitting, epoch length, corrupt samples,
augmentation, demo / synthetic / image-folder datamodules, data configs.

Ranks are simulated by passing rank / world_size to the datamodules (what they do with
the trainer's rank under DDP); DataLoader workers are real processes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from data.common import PADDING_LABEL, split_for_rank
from data.demo import DEMO_PHOTOS, DemoDataModule, ensure_demo_shards
from data.imagefolder import ImageFolderDataModule
from data.shards import SplitWriter, main as shards_main, write_index
from data.synthetic import SyntheticDataModule
from data.transforms import EvalTransform, TrainTransform
from data.webdataset_module import NodeSplitter, WebDatasetDataModule

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def encoded_image(seed: int, size=(20, 16), fmt="JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_indexed_shards(root: Path, split: str, count: int, maxcount: int, corrupt: set[int] = frozenset()) -> None:
    """Shards whose sample i has label i, so the labels of a batch identify its samples.
    Samples in ``corrupt`` get truncated JPEG bytes."""
    writer = SplitWriter(root, split, maxcount=maxcount)
    for i in range(count):
        data = encoded_image(i)
        writer.write(f"sample{i:05d}", "jpg", data[: len(data) // 3] if i in corrupt else data, i)
    counts = writer.close()
    index = json.loads((root / "shards.json").read_text())["splits"] if (root / "shards.json").exists() else {}
    index = {name: info["shards"] for name, info in index.items()}
    write_index(root, [str(i) for i in range(count)], {**index, split: counts})


def labels_seen(loader) -> list[int]:
    return [label for _, labels in loader for label in labels.tolist()]


# ----------------------------------------------------------------------------- shard writer


def test_shard_writer_round_trip_preserves_bytes_and_labels(tmp_path):
    src = tmp_path / "src"
    originals = {}
    for c, name in enumerate(["cat", "dog"]):
        (src / name).mkdir(parents=True)
        for i in range(5):
            fmt, ext = ("PNG", "png") if i == 0 else ("JPEG", "jpg")
            path = src / name / f"img.{i}.{ext}"  # a dot in the stem must not break the key
            path.write_bytes(encoded_image(10 * c + i, fmt=fmt))
            originals[path.read_bytes()] = c

    shards_main([str(src), str(tmp_path / "out"), "--maxcount", "4", "--val-fraction", "0"])

    out = tmp_path / "out"
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    read = list(wds.WebDataset(str(out / "train-{000000..000002}.tar"), shardshuffle=False))
    assert len(read) == 10
    recovered = {(sample.get("jpg") or sample.get("png")): int(sample["cls"]) for sample in read}
    assert recovered == originals
    assert json.loads((out / "shards.json").read_text())["splits"]["train"]["samples"] == 10


def test_shard_writer_holds_out_val_fraction_of_every_class(tmp_path):
    for name in ["a", "b"]:
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            (tmp_path / "src" / name / f"{i}.jpg").write_bytes(encoded_image(i))

    shards_main([str(tmp_path / "src"), str(tmp_path / "out"), "--val-fraction", "0.2"])

    val_labels = sorted(int(s["cls"]) for s in wds.WebDataset(str(tmp_path / "out" / "val-000000.tar"), shardshuffle=False))
    assert val_labels == [0, 0, 1, 1]
    splits = json.loads((tmp_path / "out" / "shards.json").read_text())["splits"]
    assert (splits["train"]["samples"], splits["val"]["samples"]) == (16, 4)


def test_shard_writer_treats_a_flat_folder_as_one_class(tmp_path):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(encoded_image(i))

    shards_main([str(tmp_path / "photos"), str(tmp_path / "out"), "--val-fraction", "0"])

    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["photos"]
    assert [int(s["cls"]) for s in wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False)] == [0] * 3


def test_shard_writer_refuses_to_mix_with_existing_shards(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "0.jpg").write_bytes(encoded_image(0))
    shards_main([str(tmp_path / "src"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--overwrite"):
        shards_main([str(tmp_path / "src"), str(tmp_path / "out")])


# ----------------------------------------------------------------------------- splitting


def test_node_splitter_gives_each_item_to_exactly_one_rank():
    items = list(range(11))
    per_rank = [list(NodeSplitter(rank, 3)(iter(items))) for rank in range(3)]
    assert sorted(sum(per_rank, [])) == items


def test_split_for_rank_drops_less_than_world_size_or_pads():
    drop = [split_for_rank(10, r, 4, "drop") for r in range(4)]
    assert [(s.start, s.stop, s.padding) for s in drop] == [(0, 2, 0), (2, 4, 0), (4, 6, 0), (6, 8, 0)]
    assert drop[0].dropped == 2
    pad = [split_for_rank(10, r, 4, "pad") for r in range(4)]
    assert [(s.start, s.stop, s.padding) for s in pad] == [(0, 3, 0), (3, 6, 0), (6, 9, 0), (9, 10, 2)]
    assert pad[0].evaluated == 10


@pytest.mark.parametrize("remainder,count", [("drop", 50), ("pad", 51)])
def test_validation_covers_every_sample_once_across_ranks_and_workers(tmp_path, remainder, count):
    write_indexed_shards(tmp_path, "val", count=count, maxcount=17)  # uneven shards: 17, 17, 16(, 1)
    seen, batches = [], []
    for rank in range(2):
        dm = WebDatasetDataModule(
            tmp_path, val_shards="val-*.tar", resolution=16, batch_size=4, num_workers=2,
            val_remainder=remainder, rank=rank, world_size=2,
        )
        loader = dm.val_dataloader()
        labels = labels_seen(loader)
        batches.append(len(list(loader)))
        assert len(loader) == batches[-1]
        seen += labels
    real = [label for label in seen if label != PADDING_LABEL]
    assert sorted(real) == list(range(count))  # each sample once, none dropped (50 % 2 == 0; pad keeps all 51)
    assert seen.count(PADDING_LABEL) == (1 if remainder == "pad" else 0)
    assert batches[0] == batches[1]  # ranks stay in step


def test_validation_drop_policy_skips_the_remainder_only(tmp_path):
    write_indexed_shards(tmp_path, "val", count=11, maxcount=4)
    seen = []
    for rank in range(3):
        dm = WebDatasetDataModule(tmp_path, resolution=16, batch_size=2, num_workers=0, rank=rank, world_size=3)
        seen += labels_seen(dm.val_dataloader())
    assert sorted(seen) == list(range(9))  # 11 // 3 = 3 per rank; the last 11 % 3 = 2 are dropped
    assert dm.val_split.dropped == 2


def test_training_yields_the_configured_batches_per_rank_every_epoch(tmp_path):
    write_indexed_shards(tmp_path, "train", count=24, maxcount=6)
    for rank in range(2):
        dm = WebDatasetDataModule(
            tmp_path, val_shards=None, resolution=16, batch_size=4, num_workers=2, train_batches_per_epoch=5,
            shuffle_buffer=8, rank=rank, world_size=2,
        )
        loader = dm.train_dataloader()
        assert len(loader) == 5
        for _epoch in range(2):
            shapes = [tuple(images.shape) for images, _ in loader]
            assert shapes == [(4, 3, 16, 16)] * 5


def test_train_batches_per_epoch_defaults_to_one_pass_over_ranks(tmp_path):
    write_indexed_shards(tmp_path, "train", count=24, maxcount=6)
    dm = WebDatasetDataModule(tmp_path, val_shards=None, resolution=16, batch_size=4, num_workers=0, rank=0, world_size=2)
    assert dm.batches_per_epoch() == 3  # 24 // (4 * 2)


# ----------------------------------------------------------------------------- corrupt samples


def test_corrupt_validation_sample_is_skipped_counted_and_padded(tmp_path):
    write_indexed_shards(tmp_path, "val", count=8, maxcount=4, corrupt={5})
    dm = WebDatasetDataModule(tmp_path, resolution=16, batch_size=4, num_workers=2, rank=0, world_size=1)
    labels = labels_seen(dm.val_dataloader())
    assert sorted(labels) == [PADDING_LABEL, 0, 1, 2, 3, 4, 6, 7]  # 5 replaced by padding: batch count unchanged
    assert dm.skipped_samples() == 1  # counted in a worker process, read in this one


def test_corrupt_training_sample_is_skipped_without_crashing(tmp_path):
    write_indexed_shards(tmp_path, "train", count=4, maxcount=4, corrupt={2})
    dm = WebDatasetDataModule(
        tmp_path, val_shards=None, resolution=16, batch_size=3, num_workers=2, train_batches_per_epoch=6, shuffle_buffer=4,
        rank=0, world_size=1,
    )
    labels = labels_seen(dm.train_dataloader())
    assert len(labels) == 18 and 2 not in labels
    assert dm.skipped_samples() >= 1  # the one bad sample, once per time its shard was drawn


# ----------------------------------------------------------------------------- transforms


def test_train_transform_crops_to_resolution_in_range_and_varies():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    transform = TrainTransform(32)
    outputs = [transform(image) for _ in range(8)]
    for out in outputs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    assert any(not torch.equal(outputs[0], out) for out in outputs[1:])


def test_eval_transform_is_a_deterministic_center_crop():
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 8:56] = 255  # white centre band 4 px wider than the crop on each side (after the 2x shrink)
    transform = EvalTransform(16)
    out = transform(Image.fromarray(pixels))
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out, torch.ones_like(out), atol=0.02)  # an off-centre crop would show black
    assert torch.equal(out, transform(Image.fromarray(pixels)))


# ----------------------------------------------------------------------------- demo / synthetic / folders


def test_demo_data_builds_and_yields_batches(tmp_path):
    dm = DemoDataModule(cache_dir=tmp_path, resolution=32, batch_size=8, num_workers=0, train_batches_per_epoch=2)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    images, labels = train[0]
    assert len(train) == 2
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < len(DEMO_PHOTOS)
    assert -1.0 <= images.min() < images.max() <= 1.0
    assert sorted(set(labels_seen(dm.val_dataloader()))) == list(range(len(DEMO_PHOTOS)))
    assert dm.skipped_samples() == 0


def _write_demo(root):
    ensure_demo_shards(root, crop_px=96, train_crops=2, val_crops=1, seed=0)


def test_demo_shards_are_written_once_by_concurrent_processes(tmp_path):
    root = tmp_path / "demo"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_demo, args=(root,)) for _ in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(60)
    assert [p.exitcode for p in writers] == [0, 0]
    shards = {p.name: p.stat().st_mtime_ns for p in root.glob("*.tar")}
    assert sorted(shards) == ["train-000000.tar", "val-000000.tar"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    _write_demo(root)  # already complete: nothing is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("*.tar")} == shards


def test_synthetic_data_is_deterministic_in_the_seed():
    def first_batch(seed):
        dm = SyntheticDataModule(resolution=16, batch_size=4, num_train=8, num_val=4, seed=seed, rank=0, world_size=1)
        return next(iter(dm.val_dataloader()))

    images, labels = first_batch(0)
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images, first_batch(0)[0])
    assert not torch.equal(images, first_batch(1)[0])


def test_synthetic_training_batches_are_disjoint_across_ranks():
    # num_classes == num_train: the label is the sample index
    per_rank = [
        labels_seen(SyntheticDataModule(resolution=8, batch_size=2, num_train=8, num_classes=8, rank=r, world_size=2).train_dataloader())
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    assert sorted(per_rank[0] + per_rank[1]) == list(range(8))


def test_image_folder_reads_classes_and_counts_unreadable_files(tmp_path):
    for split, count in (("train", 4), ("val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                (tmp_path / split / name / f"{i}.jpg").write_bytes(encoded_image(i))
    (tmp_path / "val" / "dog" / "1.jpg").write_bytes(b"not a jpeg")
    dm = ImageFolderDataModule(tmp_path, resolution=16, batch_size=2, num_workers=0, rank=0, world_size=1)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and dm.classes == ["cat", "dog"]
    assert sorted(labels_seen(dm.val_dataloader())) == [PADDING_LABEL, 0, 0, 1]
    assert dm.skipped_samples() == 1


def test_webdataset_reports_missing_shards_with_the_fix(tmp_path):
    dm = WebDatasetDataModule(tmp_path, resolution=16, batch_size=2, rank=0, world_size=1)
    with pytest.raises(FileNotFoundError, match="python -m data.shards"):
        dm.setup("fit")


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["demo", "imagenet", "imagefolder", "synthetic"])
def test_every_data_config_has_the_shared_keys(name):
    cfg = OmegaConf.load(CONF_DATA / f"{name}.yaml")
    assert {"_target_", "resolution", "batch_size", "num_workers"} <= set(cfg.keys())


def test_demo_config_instantiates_with_smoke_overrides(tmp_path):
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"paths": {"cache_dir": str(tmp_path)}, "data": OmegaConf.load(CONF_DATA / "demo.yaml")})
    cfg.data.merge_with({"resolution": 32, "batch_size": 4, "num_workers": 0})
    dm = instantiate(cfg.data)
    assert (dm.resolution, dm.batch_size, dm.num_workers) == (32, 4, 0)
    assert str(dm.root).startswith(str(tmp_path / "demo_shards"))


# ----------------------------------------------------------------------------- real DDP (slow)

DDP_SCRIPT = '''
import json, sys, torch, pytorch_lightning as pl
from data.webdataset_module import WebDatasetDataModule

class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer, self.train_batches, self.val_labels = torch.nn.Linear(3, 1), 0, []
    def training_step(self, batch, index):
        self.train_batches += 1
        loss = self.layer(batch[0].mean((2, 3))).pow(2).mean()
        self.log("loss", loss, sync_dist=True)  # a collective every step: unequal ranks would hang
        return loss
    def validation_step(self, batch, index):
        self.val_labels += batch[1].tolist()
        self.log("val", batch[0].mean(), sync_dist=True)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

root, out = sys.argv[1], sys.argv[2]
data = WebDatasetDataModule(root, resolution=16, batch_size=4, num_workers=2, train_batches_per_epoch=3,
                            shuffle_buffer=8, val_remainder="pad")
model = Recorder()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
trainer.fit(model, datamodule=data)
json.dump({"train": model.train_batches, "val": model.val_labels}, open(f"{out}/rank{trainer.global_rank}.json", "w"))
'''


@pytest.mark.slow
def test_lightning_ddp_ranks_stay_in_step_and_split_validation(tmp_path):
    write_indexed_shards(tmp_path, "train", count=16, maxcount=4)
    write_indexed_shards(tmp_path, "val", count=13, maxcount=5)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(tmp_path / "ddp.py"), str(tmp_path), str(tmp_path)],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["train"] for r in ranks] == [6, 6]  # 3 batches per rank per epoch, 2 epochs
    labels = ranks[0]["val"] + ranks[1]["val"]  # 2 epochs: every val sample twice in total, once per epoch
    assert sorted(label for label in labels if label != PADDING_LABEL) == sorted(list(range(13)) * 2)
    assert len(ranks[0]["val"]) == len(ranks[1]["val"])  # 7 per rank per epoch, one of them padding
