"""SLURM sweeps and preemption on a real local cluster (no mocks).

Needs the single-node cluster of scripts/slurm_local.sh (root):
    scripts/slurm_local.sh start && python -m pytest -m slurm tests/test_slurm.py
Each test submits real jobs running train.py with 2 gloo ranks; minutes each.
"""
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT

pytestmark = pytest.mark.slurm

SWEEP_TIMEOUT_S = 900


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if shutil.which("sinfo") is None:
        pytest.fail("Slurm is not installed. Fix: scripts/slurm_local.sh start (as root)")
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if state.returncode != 0 or not re.search(r"idle|mixed|allocated", state.stdout):
        pytest.fail(f"No Slurm node accepts jobs ({state.stdout.strip() or state.stderr.strip()}). "
                    "Fix: scripts/slurm_local.sh start (as root)")


@pytest.fixture
def workdir():
    """A fresh directory for one sweep, outside pytest's tmp_path: other pytest sessions
    on a shared machine prune old tmp_path folders while these minutes-long jobs still
    write there. Jobs of the sweep still queued or running at the end are cancelled."""
    path = Path(tempfile.mkdtemp(prefix="tokbench-slurm-"))
    yield path
    for folder in path.glob("logs/train/multiruns/*/.submitit/*"):
        subprocess.run(["scancel", folder.name], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def _env(root: Path) -> dict:
    import os

    return {**os.environ, "TOKBENCH_ROOT": str(root), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _start_sweep(root: Path, overrides: list[str]) -> subprocess.Popen:
    """``python train.py -m hydra/launcher=slurm ...`` in the background; logs in root."""
    log = open(root / "launcher.log", "w")
    return subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=slurm", *overrides], cwd=ROOT,
                            env=_env(root), stdout=log, stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, root: Path) -> str:
    try:
        process.wait(timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return (root / "launcher.log").read_text()


def _sweep_dir(root: Path) -> Path:
    (sweep,) = (root / "logs" / "train" / "multiruns").iterdir()
    return sweep


def _rank0_log(sweep: Path, job: str) -> str:
    """Rank 0's stdout, appended across requeues (submitit opens logs in append mode)."""
    return (sweep / ".submitit" / job / f"{job}_0_log.out").read_text(errors="replace")


def _poll(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def test_sweep_submits_one_job_per_point_each_with_two_ranks(workdir):
    # The command from the README, as is.
    sweep = _start_sweep(workdir, ["tokenizer=vqgan,fqgan_dual", "trainer=ddp_cpu", "debug=smoke"])
    out = _wait(sweep, workdir)
    assert sweep.returncode == 0, out[-3000:]
    swept = _sweep_dir(workdir)
    for run in ("0_vqgan", "1_fqgan_dual"):
        assert _global_step(swept / run / "checkpoints" / "last.ckpt") == 6
    jobs = sorted(p.name for p in (swept / ".submitit").iterdir() if list(p.glob("*_submitted.pkl")))
    assert len(jobs) == 2, jobs
    for job in jobs:
        rank0 = _rank0_log(swept, job)
        rank1 = (swept / ".submitit" / job / f"{job}_1_log.out").read_text(errors="replace")
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in rank0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1
    script = next((swept / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "--ntasks-per-node=2" in script and "--nodes=1" in script and "--signal=USR2@" in script


def _preempt_and_resume(root, preempt) -> tuple[Path, str, int]:
    """Starts a one-job sweep (24 steps, W&B offline), calls ``preempt(job_id)`` once
    the run passed step 3, and waits for the sweep. Returns (run dir, rank-0 log, the
    step the preemption checkpoint was saved at)."""
    sweep = _start_sweep(root, ["tokenizer=vqgan", "trainer=ddp_cpu", "debug=smoke", "logger=wandb",
                                "trainer.max_steps=24"])
    multiruns = root / "logs" / "train" / "multiruns"
    run = _poll(lambda: next(multiruns.glob("*/0_vqgan"), None), 300, "the run directory")
    _poll(lambda: (run / "images" / "train_step0000003.png").exists(), 600, "step 3")  # grid every 3 steps
    (job,) = [p.name for p in (run.parent / ".submitit").iterdir() if list(p.glob("*_submitted.pkl"))]
    preempt(job)
    out = _wait(sweep, root)
    assert sweep.returncode == 0, out[-3000:]
    log = _rank0_log(run.parent, job)
    saved = re.findall(r"Saved preemption checkpoint .* at global step (\d+)", log)
    assert len(saved) == 1, log[-3000:]
    return run, log, int(saved[0])


def test_warning_signal_saves_requeues_and_resumes_at_the_saved_step(workdir):
    # USR2 is what Slurm sends signal_delay_s before the time limit (--signal=USR2@...).
    run, log, step = _preempt_and_resume(
        workdir, lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True))
    assert 3 <= step < 24
    assert re.search(rf"\(restart 1\): training from global step {step};", log), log[-3000:]
    assert _global_step(run / "checkpoints" / "last.ckpt") == 24
    # one W&B run across both parts: same id, and each part's offline file holds history
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    parts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(f"-{run_id}") for p in parts), parts
    for part in parts:
        assert b"trainer/global_step" in (part / f"run-{run_id}.wandb").read_bytes()


def test_sigterm_from_a_requeue_saves_before_the_job_stops(workdir):
    # `scontrol requeue` (an admin, or PreemptMode=REQUEUE) SIGTERMs the job and requeues
    # it itself; the run saves within KillWait and resumes when it comes back.
    run, log, step = _preempt_and_resume(
        workdir, lambda job: subprocess.run(["scontrol", "requeue", job], check=True))
    assert "SIGTERM received" in log
    assert re.search(rf"\(restart 1\): training from global step {step};", log), log[-3000:]
    assert _global_step(run / "checkpoints" / "last.ckpt") == 24
