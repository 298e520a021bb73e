"""Fault table (docs/faults.md): disk full while saving, two runs on one run directory,
resume keeps the logs and applies a changed optimizer setting."""
from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

from fault_helpers import load, run
from helpers import ROOT
from training.checkpoints import AtomicCheckpointIO, CheckpointWriteError
from training.preflight import remove_fresh_run_dir
from training.run_lock import LOCK_FILE, RunDirectoryInUse, run_directory_lock, starts_the_run


# ----------------------------------------------------------------------------- disk full


def test_disk_full_while_saving_names_the_fix_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(1000.0)}, path)

    def fills_the_disk(obj, handle, *args, **kwargs):
        handle.write(b"\0" * 4096)  # part of the file reaches the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(CheckpointWriteError) as error:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert str(path) in message and "No space left" in message and "intact" in message and "Fix:" in message
    saved = load(path)
    assert saved["global_step"] == 1 and torch.equal(saved["w"], torch.arange(1000.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no leftover .tmp


def test_any_failed_save_removes_its_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"

    def breaks(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(torch, "save", breaks)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- one run per directory

HOLD_LOCK = (
    "import sys, time; sys.path.insert(0, {root!r}); from training.run_lock import run_directory_lock\n"
    "with run_directory_lock({run!r}):\n    print('locked', flush=True); time.sleep(600)\n"
)


def test_a_second_run_on_the_same_directory_refuses_and_a_killed_run_leaves_no_stuck_lock(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")}
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT), run=str(run_dir))],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryInUse, match=f"pid {first.pid} .*hydra.run.dir"):
            run(run_dir, "trainer.max_steps=1")
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # refused before writing anything
        assert not remove_fresh_run_dir(run_dir)  # train.py's clean-up of failed starts leaves a held directory
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with run_directory_lock(run_dir):  # the killed holder left nothing stuck
        pass


def test_only_the_launching_process_takes_the_lock():
    assert starts_the_run({}) and starts_the_run({"RANK": "0", "LOCAL_RANK": "0", "SLURM_PROCID": "0"})
    for variable in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        assert not starts_the_run({variable: "1"})  # other DDP ranks share the directory by design


# ----------------------------------------------------------------------------- resume


def _logged_steps(run_dir) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss/total")})


def test_resume_appends_to_the_logs_and_applies_a_changed_learning_rate(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run(run_dir, "trainer.max_steps=2", "logger=csv")
    first = load(run_dir / "checkpoints" / "last.ckpt")
    assert first["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert _logged_steps(run_dir) == [0, 1]

    with caplog.at_level("WARNING"):
        run(run_dir, "trainer.max_steps=4", "logger=csv", "module.optimizer.lr=3e-4")  # resume=auto
    final = load(run_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 4
    assert _logged_steps(run_dir) == [0, 1, 2, 3]  # the first run's rows are still there
    # the new learning rate is what the optimizer used, and what the saved config says
    assert final["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(3e-4)
    assert final["config"]["module"]["optimizer"]["lr"] == pytest.approx(3e-4)
    assert final["optimizer_states"][1]["param_groups"][0]["lr"] == pytest.approx(1e-4)  # unchanged: kept
    assert final["optimizer_states"][0]["state"][0]["step"] == 4  # moments continued, not restarted
    assert "module.optimizer.lr: 0.0001 -> 0.0003" in caplog.text  # and the user is told


def test_resume_after_a_validated_last_step_logs_every_step_once(tmp_path):
    # validation at the saved step is the case where Lightning's restart adds one to its
    # logging counter without training a batch (training/resume.py: LoggedStepAfterResume)
    run_dir, every = tmp_path / "run", ["trainer.val_check_interval=3", "trainer.limit_val_batches=1", "logger=csv"]
    run(run_dir, "trainer.max_steps=3", *every)
    assert _logged_steps(run_dir) == [0, 1, 2]
    run(run_dir, "trainer.max_steps=6", *every)  # resume=auto
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert _logged_steps(run_dir) == [0, 1, 2, 3, 4, 5]
    # a second resume from the counter the first resume saved continues the same way
    run(run_dir, "trainer.max_steps=9", *every)
    assert _logged_steps(run_dir) == list(range(9))


class CrashAtStep(pl.Callback):
    """Stops the run with an error at the start of training step ``step`` (a crash: no final save)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_from_a_checkpoint_written_inside_the_loop_continues_the_logged_steps(tmp_path):
    # the other case of LoggedStepAfterResume: a crashed run's last.ckpt was written by
    # Lightning inside the loop, and its counter must be left as Lightning restores it
    run_dir = tmp_path / "run"
    every = ["callbacks.model_checkpoint.every_n_train_steps=2", "logger=csv"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(run_dir, "trainer.max_steps=8", *every, "+callbacks.crash={_target_: test_faults_resume.CrashAtStep, step: 5}")
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    run(run_dir, "trainer.max_steps=8", *every)
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle) if r.get("train/loss/total")]
    # the crashed run logged 0-4; its checkpoint holds step 4, which the resumed run trains again
    assert steps == [0, 1, 2, 3, 4, 4, 5, 6, 7]
