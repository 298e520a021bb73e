"""train.py as a user runs it. One real subprocess run stays in the fast suite; resume,
``ckpt_path`` and rank splitting are checked on the state itself in process
(tests/test_resume_state.py, tests/test_effects_data.py); the 2-rank DDP run and the
subprocess resume are slow."""
import csv
import re

import pytest
import torch

from helpers import ROOT, run_train


def _steps_logged(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss/total")})


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_smoke_run_leaves_checkpoint_images_and_metrics(tmp_path):
    run = tmp_path / "run"
    p = run_train([f"hydra.run.dir={run}", "debug=smoke", "cpu_threads=1"])
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = _load(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    assert ckpt["config"]["tokenizer"]["_target_"] == "tokenizers.vqgan.VQGAN"
    assert ckpt["config"]["trainer"]["max_steps"] == 6  # the composed config of this run
    state = ckpt["state_dict"]
    # the EMA copy was trained (it moved away from the raw weights' path, not a copy of them)
    raw, ema = state["tokenizer.decoder.conv_out.weight"], state["ema.module.decoder.conv_out.weight"]
    assert not torch.equal(raw, ema) and int(state["ema.num_updates"]) == 6
    # both optimizers hold state; the discriminator's from disc_start=2 on (4 steps)
    tok_opt, disc_opt = ckpt["optimizer_states"]
    assert tok_opt["state"] and all(int(s["step"]) == 6 for s in tok_opt["state"].values())
    assert disc_opt["state"] and all(int(s["step"]) == 4 for s in disc_opt["state"].values())
    assert sorted(p.name for p in (run / "images").glob("val_step*.png")) == ["val_step0000003.png",
                                                                           "val_step0000006.png"]
    assert _steps_logged(run) == list(range(6))
    with open(run / "csv" / "metrics.csv") as f:
        psnr = [float(r["val/psnr"]) for r in csv.DictReader(f) if r.get("val/psnr")]
    assert len(psnr) == 2 and all(0 < v < 60 for v in psnr)


def test_unknown_tokenizer_lists_the_available_options(capsys):
    from training.preflight import check_overrides

    with pytest.raises(SystemExit):  # what train.py runs before Hydra starts
        check_overrides(ROOT / "conf", "train", ["tokenizer=nonexistent"])
    message = capsys.readouterr().err
    assert "There is no tokenizer=nonexistent" in message
    assert all(name in message for name in ("vqgan", "fqgan_dual", "vavae", "flextok"))  # the options are listed


def test_reference_experiment_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=vqgan_llamagen_in1k256"], return_hydra_config=True)
    assert cfg.tokenizer.quantizer.codebook_size == 16384
    assert cfg.tokenizer.encoder.mults == [1, 1, 2, 2, 4]
    assert cfg.data.resolution == 256 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.gan.disc_start == 20000 and cfg.loss.perceptual.on_missing == "error"


@pytest.mark.slow
def test_resumed_subprocess_run_continues_at_the_saved_step(tmp_path):
    run = tmp_path / "run"
    first = run_train([f"hydra.run.dir={run}", "debug=smoke", "trainer.max_steps=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    saved = _load(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3
    # same run directory, resume=auto (the default) picks up checkpoints/last.ckpt
    second = run_train([f"hydra.run.dir={run}", "debug=smoke", "trainer.max_steps=6"])
    assert second.returncode == 0, second.stderr[-3000:]
    final = _load(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 6
    assert int(final["state_dict"]["ema.num_updates"]) == 6  # 3 saved + 3 resumed, not 3 fresh
    steps = _steps_logged(run)
    assert steps and max(steps) == 5 and 3 in steps


@pytest.mark.slow
def test_ddp_cpu_runs_two_ranks_on_disjoint_shards(tmp_path):
    run = tmp_path / "run"
    p = run_train([f"hydra.run.dir={run}", "debug=smoke", "trainer=ddp_cpu", "trainer.max_steps=4"])
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    shards = dict(re.findall(r"Training shards for rank (\d)/2: (.+)", out))
    assert set(shards) == {"0", "1"}
    sets = [set(s.strip().split(", ")) for s in shards.values()]
    assert "all (shared)" not in out and not (sets[0] & sets[1])
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == 4
