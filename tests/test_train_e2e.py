"""train.py as a user runs it: subprocesses with debug=smoke."""
import csv

import pytest
import torch

from helpers import ROOT, run_train


def _steps_logged(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss/total")})


def test_smoke_run_leaves_checkpoint_images_and_metrics(tmp_path):
    run = tmp_path / "run"
    p = run_train([f"hydra.run.dir={run}", "debug=smoke"])
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert ckpt["config"]["tokenizer"]["_target_"] == "tokenizers.vqgan.VQGAN"
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"]) == 2  # tokenizer + discriminator
    assert list((run / "images").glob("val_step*.png"))
    assert _steps_logged(run)


def test_resumed_run_continues_at_the_saved_step(tmp_path):
    run = tmp_path / "run"
    first = run_train([f"hydra.run.dir={run}", "debug=smoke", "trainer.max_steps=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    (run / "csv" / "metrics.csv").rename(run / "first_metrics.csv")
    # same run directory, resume=auto (the default) picks up checkpoints/last.ckpt
    second = run_train([f"hydra.run.dir={run}", "debug=smoke", "trainer.max_steps=6"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout + second.stderr
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6
    steps = _steps_logged(run)
    assert steps and min(steps) >= 3  # logging continued after the saved step, not from 0
    # optimizer, discriminator and EMA state travelled with it
    assert len(final["optimizer_states"]) == 2 and final["optimizer_states"][0]["state"]
    assert int(final["state_dict"]["ema.num_updates"]) == 6


def test_ckpt_path_may_be_a_run_directory(tmp_path):
    run = tmp_path / "run"
    assert run_train([f"hydra.run.dir={run}", "debug=smoke", "trainer.max_steps=2"]).returncode == 0
    other = tmp_path / "other"
    p = run_train([f"hydra.run.dir={other}", "debug=smoke", "trainer.max_steps=4", f"ckpt_path={run}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert torch.load(other / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4


def test_unknown_tokenizer_lists_the_available_options(tmp_path):
    p = run_train([f"hydra.run.dir={tmp_path}", "tokenizer=nonexistent"])
    assert p.returncode != 0
    assert "There is no tokenizer=nonexistent" in p.stderr
    assert "vqgan" in p.stderr  # Hydra lists the options


def test_reference_experiment_composes():
    from hydra import compose, initialize_config_dir


    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=vqgan_llamagen_in1k256"], return_hydra_config=True)
    assert cfg.tokenizer.quantizer.codebook_size == 16384
    assert cfg.tokenizer.encoder.mults == [1, 1, 2, 2, 4]
    assert cfg.data.resolution == 256 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.gan.disc_start == 20000 and cfg.loss.perceptual.on_missing == "error"


def test_ddp_cpu_runs_two_ranks_on_disjoint_shards(tmp_path):
    import re

    run = tmp_path / "run"
    p = run_train([f"hydra.run.dir={run}", "debug=smoke", "trainer=ddp_cpu", "trainer.max_steps=4"])
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    shards = dict(re.findall(r"Training shards for rank (\d)/2: (.+)", out))
    assert set(shards) == {"0", "1"}
    sets = [set(s.strip().split(", ")) for s in shards.values()]
    assert "all (shared)" not in out and not (sets[0] & sets[1])
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
