"""Checkpoints hold what cannot be rebuilt; two runs with one seed log the same numbers."""
import csv

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from helpers import ROOT


def train_in_process(run_dir, overrides):
    """``train.py`` without the subprocess: compose, set Hydra's runtime config, train."""
    from training.run import train

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={run_dir}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return train(cfg)


SMOKE = ["debug=smoke", "trainer.max_steps=4", "trainer.val_check_interval=2", "callbacks.reconstruction_grid=null"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("same_seed")
    return [(root / name, train_in_process(root / name, [*SMOKE, "seed=5"])) for name in ("a", "b")]


def _logged(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {(r["step"], k): v for r in rows for k, v in r.items() if v and k != "step"}


@pytest.mark.slow
def test_same_seed_gives_identical_logged_losses_and_validation(two_runs):
    (dir_a, metrics_a), (dir_b, metrics_b) = two_runs
    logged_a, logged_b = _logged(dir_a), _logged(dir_b)
    assert any(k == "train/loss/total" for _, k in logged_a) and any(k == "val/psnr" for _, k in logged_a)
    assert logged_a == logged_b
    assert metrics_a["val/psnr"] == metrics_b["val/psnr"]


@pytest.mark.slow
def test_checkpoint_holds_no_lpips_and_resumes(two_runs, tmp_path):
    run_dir, _ = two_runs[0]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not [k for k in ckpt["state_dict"] if k.startswith("loss.perceptual.")]
    assert [k for k in ckpt["state_dict"] if k.startswith("tokenizer.")]
    # resuming from it (strict loading in Lightning) continues at the saved step
    train_in_process(tmp_path / "resumed", [*SMOKE, "seed=5", "trainer.max_steps=5", f"ckpt_path={run_dir}"])
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 5


def _smoke_module():
    from training.run import build_module

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke", "run_name=t", "paths.output_dir=/tmp/unused"])
    return build_module(cfg)


def test_saved_state_leaves_out_lpips_and_both_formats_load_strictly():
    module = _smoke_module()
    lpips_keys = [k for k in module.state_dict() if k.startswith("loss.perceptual.")]
    assert lpips_keys and module.rebuilt_prefixes() == ("loss.perceptual.",)

    new = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(new)
    assert not [k for k in new["state_dict"] if k.startswith("loss.perceptual.")]
    assert len(new["state_dict"]) == len(module.state_dict()) - len(lpips_keys)

    old = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}  # before this change
    old["state_dict"][lpips_keys[0]] += 1.0
    other = _smoke_module()
    rebuilt = other.state_dict()[lpips_keys[0]].clone()  # what its own weight file (here: seed) gave
    for checkpoint, expected in ((new, rebuilt), (old, old["state_dict"][lpips_keys[0]])):
        other.on_load_checkpoint(checkpoint)
        other.load_state_dict(checkpoint["state_dict"], strict=True)  # what Lightning does on resume
        assert torch.equal(other.state_dict()[lpips_keys[0]], expected)
