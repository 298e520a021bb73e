"""Class folders -> shards with a validation split -> training that validates; no split -> a warning."""
import io
import logging

import pytest
import webdataset as wds
from PIL import Image

from data.shards import main as shards_main
from data.webdataset_module import WebDatasetDataModule


def _class_folders(src, classes=3, per_class=6, size=40):
    for c in range(classes):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c, 20 * i, 90)).save(src / f"class{c}" / f"{i}.png")
    return src


def test_shard_writer_holds_out_a_validation_split_by_itself(tmp_path, capsys):
    src = _class_folders(tmp_path / "src")
    shards_main([str(src), str(tmp_path / "out")])
    val = list(wds.WebDataset(str(tmp_path / "out" / "val-000000.tar"), shardshuffle=False))
    train = list(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False))
    assert sorted(int(s["cls"]) for s in val) == [0, 1, 2]  # at least one of every class
    assert len(train) == 15 and not {s["__key__"] for s in val} & {s["__key__"] for s in train}
    assert "held out 1.0% of every class" in capsys.readouterr().out


def test_training_without_validation_shards_warns_and_skips_validation(tmp_path, caplog):
    src = _class_folders(tmp_path / "src")
    shards_main([str(src), str(tmp_path / "out"), "--val-fraction", "0"])
    dm = WebDatasetDataModule(tmp_path / "out", resolution=16, batch_size=2, num_workers=0, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert dm.val_dataloader() == []
    assert "training runs WITHOUT validation" in caplog.text
    with pytest.raises(FileNotFoundError):  # validating on purpose still needs the shards
        WebDatasetDataModule(tmp_path / "out", resolution=16, rank=0, world_size=1).setup("validate")


@pytest.mark.slow
def test_class_folders_to_shards_to_training_with_validation(tmp_path):
    from test_checkpoint_contents import train_in_process

    src = _class_folders(tmp_path / "src", per_class=8, size=48)
    shards_main([str(src), str(tmp_path / "shards")])
    metrics = train_in_process(tmp_path / "run", [
        "debug=smoke", "data=imagenet", f"data.root={tmp_path / 'shards'}", "data.resolution=32",
        "data.batch_size=4", "data.num_workers=0", "data.train_batches_per_epoch=null", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "callbacks.reconstruction_grid=null"])
    assert "val/psnr" in metrics
