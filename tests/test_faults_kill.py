"""Fault table (docs/faults.md): ``kill -9`` during checkpoint writes and mid-run. A loadable
``last.ckpt`` always exists, holding a complete save no older than the last one finished,
and the run started again with the same command continues at its saved step."""
from __future__ import annotations

import csv
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fault_helpers import FAST_RUN, load
from helpers import ROOT
from training.checkpoints import AtomicCheckpointIO


def _save_forever(path: str, done) -> None:
    """Child: saves checkpoints 1, 2, 3, ... (each about 16 MB, the step repeated in every
    value so a mixed or partial file is detectable) and reports each finished save."""
    io = AtomicCheckpointIO()
    step = 0
    while True:
        step += 1
        # numpy, not torch ops: torch's thread pool does not survive a fork
        weights = torch.from_numpy(np.full(4_000_000, step, dtype=np.float32))
        io.save_checkpoint({"global_step": step, "weights": weights}, path)
        done.value = step


def test_kill_9_at_random_moments_of_checkpoint_writes_always_leaves_a_complete_last_ckpt(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    fork = multiprocessing.get_context("fork")  # the saving code is already imported: no start-up per kill
    rng = random.Random(0)
    killed_mid_write = 0
    for _ in range(8):
        done = fork.Value("q", 0)
        child = fork.Process(target=_save_forever, args=(str(path), done))
        child.start()
        deadline = time.monotonic() + 30
        while done.value < 1 and time.monotonic() < deadline:  # at least one save of this child finished
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        finished = done.value
        killed_mid_write += path.with_name("last.ckpt.tmp").exists()
        saved = load(path)  # never truncated
        step = saved["global_step"]
        assert step >= finished >= 1  # no finished save lost (the kill may land between rename and report)
        assert torch.equal(saved["weights"], torch.full((4_000_000,), float(step)))  # one complete save
    assert killed_mid_write >= 3  # most kills hit a write in progress, or the test proved nothing


def _steps_in_csv(run_dir) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss/total")]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_train_py_killed_mid_run_resumes_at_the_saved_step_with_the_saved_config(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *FAST_RUN,
               "trainer.max_steps=40", "callbacks.model_checkpoint.every_n_train_steps=2", "logger=csv"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        if last.exists() and load(last)["global_step"] >= 4:
            break
        time.sleep(0.2)
    time.sleep(random.Random(1).uniform(0, 0.5))  # a few steps at most: 40 take several seconds
    first.send_signal(signal.SIGKILL)
    first.wait()
    saved = load(last)
    assert 4 <= saved["global_step"] < 40, "the run ended before it could be killed"
    logged_before = _steps_in_csv(run_dir)

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]  # the killed run's lock did not block it
    assert f"Resuming from {last}" in second.stdout + second.stderr
    final = load(last)
    assert final["global_step"] == 40 and final["config"] == saved["config"]
    assert int(final["state_dict"]["ema.num_updates"]) == 40  # every step counted once: none lost, none repeated
    steps = _steps_in_csv(run_dir)
    assert steps[: len(logged_before)] == logged_before  # the killed run's rows are kept
    resumed = steps[len(logged_before):]
    assert resumed[0] == saved["global_step"] and resumed[-1] == 39  # continued at the saved step
    # rows are written at every logging step (smoke: 1); the saved step's own row may follow the save
    assert set(range(saved["global_step"] - 1)) <= set(logged_before)
