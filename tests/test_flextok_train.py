"""`python train.py tokenizer=flextok ...` as a user runs it (slow: subprocesses)."""
import csv

import pytest
import torch

from helpers import run_train

pytestmark = pytest.mark.slow


def _logged_columns(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return set(csv.DictReader(f).fieldnames or [])


def test_flextok_smoke_run_trains_on_the_stand_in_and_saves_no_vae_or_teacher(tmp_path):
    run = tmp_path / "run"
    p = run_train([f"hydra.run.dir={run}", "tokenizer=flextok", "debug=smoke"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "STAND-IN" in p.stdout + p.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert ckpt["config"]["tokenizer"]["_target_"] == "tokenizers.flextok.FlexTok"
    assert not any(".codec." in k or ".teacher." in k for k in ckpt["state_dict"])
    assert {"train/loss/flow", "train/loss/repa", "val/loss/flow"} <= _logged_columns(run)
    assert list((run / "images").glob("val_step*.png"))


def test_flextok_trains_over_a_tokenizer_vae_checkpoint(tmp_path):
    vae_run, run = tmp_path / "vae", tmp_path / "flextok"
    p = run_train([f"hydra.run.dir={vae_run}", "tokenizer=vae", "debug=smoke", "trainer.max_steps=2"])
    assert p.returncode == 0, p.stderr[-3000:]
    vae_ckpt = vae_run / "checkpoints" / "last.ckpt"
    p = run_train([f"hydra.run.dir={run}", "tokenizer=flextok", "debug=smoke", "loss=none", "gan=none",
                   "trainer.max_steps=3", f"tokenizer.vae_ckpt={vae_ckpt}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "STAND-IN" not in p.stdout + p.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
