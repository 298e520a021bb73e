"""The learning-rate schedule reaches the optimizers (and survives a resume), and a run whose
last step falls between two validations still ends with its final weights validated."""
from __future__ import annotations

import csv

import pytest
from fault_helpers import load, run
from inprocess import repeated_batches, tiny_module, trainer
from training.schedules import WarmupStableDecay

SCHEDULE = "+module.lr_schedule={_target_: training.schedules.WarmupStableDecay, warmup_steps: 2, decay_steps: 4}"


def test_warmup_stable_decay_factors():
    s = WarmupStableDecay(warmup_steps=4, decay_steps=4, final_ratio=0.2)
    factors = [s(step, 12) for step in range(12)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4:9] == [1.0] * 5
    assert factors[8:] == pytest.approx([1.0, 0.8, 0.6, 0.4])  # linear towards 0.2 at step 12
    assert WarmupStableDecay(decay_fraction=0.5)(7, 10) == pytest.approx(0.6)
    assert WarmupStableDecay()(5, 10) == 1.0
    with pytest.raises(ValueError, match="not both"):
        WarmupStableDecay(decay_steps=2, decay_fraction=0.5)


def test_the_schedule_sets_both_optimizers_rates_at_each_step():
    from pytorch_lightning import Callback

    schedule = WarmupStableDecay(warmup_steps=2, decay_steps=2)
    module = tiny_module(lr_schedule=schedule, disc_start=0)
    seen: list[tuple[float, float]] = []

    class AfterStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            opt_g, opt_d = pl_module._optimizers()
            seen.append((opt_g.param_groups[0]["lr"], opt_d.optimizer.param_groups[0]["lr"]))

    trainer(6, callbacks=[AfterStep()]).fit(module, repeated_batches())
    expected = [1e-4 * schedule(step, 6) for step in range(6)]  # tiny_module's Adam default lr
    assert [g for g, _ in seen] == pytest.approx(expected)
    assert [d for _, d in seen] == pytest.approx(expected)
    assert expected[1] > expected[0] and expected[-1] < expected[2]  # warm-up and decay both seen


def test_a_resumed_run_continues_on_the_schedule(tmp_path, caplog):
    run_dir = tmp_path / "run"
    every = [SCHEDULE, "logger=csv", "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(run_dir, *every, "+callbacks.crash={_target_: test_faults_resume.CrashAtStep, step: 4}")
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    run(run_dir, *every)
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        factors = {int(r["step"]): float(r["train/lr_factor"]) for r in csv.DictReader(handle)
                   if r.get("train/lr_factor")}
    schedule = WarmupStableDecay(warmup_steps=2, decay_steps=4)
    assert factors == pytest.approx({step: schedule(step, 6) for step in range(6)})
    lr = load(run_dir / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-4 * schedule(5, 6))
    # the scheduled rate is not a changed setting
    assert "optimizer lr" not in caplog.text


def test_a_run_ending_between_validations_validates_its_final_weights(tmp_path):
    run_dir = tmp_path / "run"
    metrics = run(run_dir, "trainer.max_steps=5", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
                  "logger=csv")
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        validated = [int(r["step"]) for r in csv.DictReader(handle) if r.get("val/psnr")]
    # in the loop Lightning logs a validation at the step before its counter moves (after 3
    # steps: row 2); the final one, after fit, at the step count itself (after 5 steps: row 5)
    assert validated == [2, 5]
    # the returned (and printed) figures are the final validation's
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        last = [float(r["val/psnr"]) for r in csv.DictReader(handle) if r.get("val/psnr")][-1]
    assert metrics["val/psnr"] == pytest.approx(last)
