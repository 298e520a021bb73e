"""PreemptionCheckpoint in one process, without Slurm: a signal during training stops the
run at the next batch boundary with a complete last.ckpt. (Requeue and resume on a real
cluster: tests/test_slurm.py.)"""
import os
import signal

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from training.slurm import Preempted, PreemptionCheckpoint, SubmititLocalEnvironment, cluster_environment


class SignalsItselfAt(pl.LightningModule):
    """A linear model that sends ``signum`` to its own process during batch ``at``."""

    def __init__(self, signum: int, at: int):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.signum, self.at = signum, at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.at:
            os.kill(os.getpid(), self.signum)
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def harmless(request):
    """Signals that do nothing unless the callback takes them over: a regression fails
    the assertions instead of killing pytest."""
    saved = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _fit(tmp_path, signum, **callback_kwargs):
    callback = PreemptionCheckpoint(only_under_slurm=False, requeue=False, dirpath=str(tmp_path / "checkpoints"),
                                    **callback_kwargs)
    trainer = pl.Trainer(max_steps=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=tmp_path)
    data = DataLoader(TensorDataset(torch.randn(40, 4)), batch_size=2)
    with pytest.raises(Preempted) as stopped:
        trainer.fit(SignalsItselfAt(signum, at=2), data)
    return trainer, stopped.value


def test_warning_signal_saves_last_ckpt_at_the_next_batch_boundary_and_stops(tmp_path, harmless):
    trainer, stopped = _fit(tmp_path, signal.SIGUSR2, signal_name="USR2")
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == trainer.global_step == 3  # batches 0, 1, 2; not max_steps
    assert "SIGUSR2" in str(stopped) and "global step 3" in str(stopped)


def test_sigterm_saves_too(tmp_path, harmless):
    trainer, stopped = _fit(tmp_path, signal.SIGTERM, signal_name="USR2")
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    assert "SIGTERM" in str(stopped)


def test_signal_name_follows_submitits_variable(monkeypatch):
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert PreemptionCheckpoint().signum == signal.SIGUSR1


def test_ranks_of_a_submitit_local_job_come_from_its_variables(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for key, value in dict(NTASKS="2", GLOBALID="1", LOCALID="1", NODEID="0", JOB_ID="4242").items():
        monkeypatch.setenv(f"SUBMITIT_LOCAL_{key}", value)
    for key in ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    env = cluster_environment()
    assert isinstance(env, SubmititLocalEnvironment)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (2, 1, 1, 0)
    assert env.main_port == SubmititLocalEnvironment().main_port  # every task derives the same port
