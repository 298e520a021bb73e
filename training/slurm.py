"""SLURM inside the job: who owns the preemption signal, and how ranks are found.
(The submitting side, the ``hydra/launcher=slurm`` launcher, lives in
``hydra_plugins/tokbench_launchers``: Hydra only loads launchers from that package.)

How the pieces share the work (read from submitit 1.5 and Lightning 2.6):

- submitit's sbatch file asks Slurm for ``--signal=USR2@<signal_delay_s>`` (the signal
  name comes from ``SUBMITIT_PREEMPT_SIGNAL``, default USR2). Slurm sends it to every
  task of the job step, i.e. to every rank, that many seconds before the time limit.
- In every task, submitit installs a USR2 handler that, on global rank 0 only, pickles
  the Hydra task again (with one fewer allowed timeout when the time limit is the
  cause), runs ``scontrol requeue`` and exits. On its own that requeues a job *without*
  saving training state, from the middle of a step.
- Lightning, when it detects SLURM with ``auto_requeue=True`` (its default), installs a
  second owner on SIGUSR1 that writes an ``hpc_ckpt_*.ckpt`` from inside the signal
  handler. We turn that off (:func:`cluster_environment` returns
  ``SLURMEnvironment(auto_requeue=False)``), so Lightning only reads ranks from SLURM.
- :class:`PreemptionCheckpoint` takes the signal over once training runs: its handler
  only sets a flag. At the next batch boundary all ranks agree (one collective), write
  ``<run dir>/checkpoints/last.ckpt`` together, then rank 0 hands over to submitit's
  handler (requeue bookkeeping and ``scontrol requeue``; plain ``scontrol requeue``
  outside submitit), and every rank exits without a result so the launcher keeps
  waiting. SIGTERM (scancel, preemption with ``PreemptMode=REQUEUE``) gets the same
  save, without a requeue: Slurm decides whether the job comes back.
- When the job starts again, ``train.py`` finds ``last.ckpt`` in the same run directory
  (``resume: auto``) and the W&B run id stored beside it: same step, optimizer,
  discriminator and EMA state, same W&B run.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

log = logging.getLogger(__name__)

# What submitit asks Slurm to send before the time limit (same variable submitit reads).
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"


def preemption_signal_name() -> str:
    return os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")


def in_slurm_step() -> bool:
    """This process is a task of a Slurm job step (srun), as Lightning decides it, without
    the warning Lightning's ``SLURMEnvironment.detect()`` prints on any machine where srun
    exists but is not used (a login node, a laptop with the test cluster)."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array id>_<task id>`` inside an array job."""
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID")


# --------------------------------------------------------------------------------------
# Cluster environments (Trainer plugins)
# --------------------------------------------------------------------------------------


class SubmititLocalEnvironment(ClusterEnvironment):
    """Ranks of a job started by submitit's local executor with ``tasks_per_node > 1``
    (``hydra/launcher=local``): submitit starts one process per device, like srun does,
    and sets ``SUBMITIT_LOCAL_*`` variables that Lightning does not know about."""

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        # Every task of the job derives the same port from the job id (submitit's
        # controller pid), so concurrent local jobs do not collide.
        job = os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0")
        return 20000 + zlib.crc32(job.encode()) % 20000

    @staticmethod
    def detect() -> bool:
        return os.environ.get("SUBMITIT_EXECUTOR") == "local" and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1

    def world_size(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_NTASKS"])

    def set_world_size(self, size: int) -> None:
        if size != self.world_size():
            raise RuntimeError(
                f"submitit started {self.world_size()} local tasks but the trainer wants {size} processes. "
                "Fix: hydra.launcher.tasks_per_node must equal trainer.devices (conf/hydra/launcher/local.yaml)."
            )

    def global_rank(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_GLOBALID"])

    def set_global_rank(self, rank: int) -> None:
        pass  # fixed by submitit

    def local_rank(self) -> int:
        return int(os.environ["SUBMITIT_LOCAL_LOCALID"])

    def node_rank(self) -> int:
        return int(os.environ.get("SUBMITIT_LOCAL_NODEID", "0"))


def cluster_environment() -> ClusterEnvironment:
    """The Trainer plugin for the process manager that started this process
    (``plugins.cluster_environment`` in conf/train.yaml).

    Same order as Lightning's own choice (torchelastic, SLURM, LSF, MPI, else Lightning's
    launcher), with two differences: under SLURM, Lightning's auto-requeue is off so that
    :class:`PreemptionCheckpoint` is the only owner of the preemption signal; under
    submitit's local executor with several tasks, ranks come from submitit.
    """
    from lightning_fabric.plugins.environments import (LightningEnvironment, LSFEnvironment, MPIEnvironment,
                                                       TorchElasticEnvironment)

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if in_slurm_step():
        return SLURMEnvironment(auto_requeue=False)
    if SubmititLocalEnvironment.detect():
        return SubmititLocalEnvironment()
    for environment in (LSFEnvironment, MPIEnvironment):
        if environment.detect():
            return environment()
    return LightningEnvironment()


# --------------------------------------------------------------------------------------
# The signal owner
# --------------------------------------------------------------------------------------


def _has_service_process(logger) -> bool:
    return type(logger).__name__ == "WandbLogger"


class Preempted(SystemExit):
    """Ends every rank after the preemption checkpoint is on disk. A SystemExit, not an
    Exception: submitit then writes no result, so the launcher keeps waiting for the
    requeued job instead of reporting it finished or failed."""


class PreemptionCheckpoint(pl.Callback):
    """Owns SLURM's warning signal (and SIGTERM) while training runs.

    On the signal: at the next training-batch boundary, all ranks write
    ``<checkpoint dir>/last.ckpt`` together (complete, atomic through the run's
    CheckpointIO), then the job is requeued (warning signal) or left to Slurm (SIGTERM),
    and every rank exits. Does nothing outside SLURM (``only_under_slurm``).

    Args:
        signal_name: the warning signal; default the one submitit asks Slurm for
            (``SUBMITIT_PREEMPT_SIGNAL``, default USR2).
        save_on_sigterm: also save on SIGTERM (preemption, ``scancel``). Slurm sends
            SIGKILL ``KillWait`` (or the partition's ``GraceTime``) seconds later.
        requeue: requeue the job after saving on the warning signal.
        dirpath: where ``last.ckpt`` goes; default the ModelCheckpoint callback's
            ``dirpath`` (``<run dir>/checkpoints``).
        only_under_slurm: inactive unless the process runs in a SLURM job step.
    """

    def __init__(self, signal_name: str | None = None, save_on_sigterm: bool = True, requeue: bool = True,
                 dirpath: str | None = None, only_under_slurm: bool = True):
        self.signal_name = (signal_name or preemption_signal_name()).upper().removeprefix("SIG")
        self.signum = getattr(signal, "SIG" + self.signal_name, None)
        if self.signum is None:
            raise ValueError(f"Unknown signal {signal_name!r}. Fix: use a name such as USR1 or USR2.")
        self.save_on_sigterm = save_on_sigterm
        self.requeue = requeue
        self.dirpath = dirpath
        self.only_under_slurm = only_under_slurm
        self._warned = False  # warning signal seen by this process
        self._terminated = False  # SIGTERM seen by this process
        self._previous: dict[int, Any] = {}
        self._trainer: pl.Trainer | None = None

    # -- signal handlers: set flags only (no logging, no I/O: they interrupt any code) --
    def _on_warning(self, signum, frame) -> None:
        self._warned = True

    def _on_sigterm(self, signum, frame) -> None:
        self._terminated = True
        # Slurm sends SIGTERM to every process of the job, so W&B's service process is
        # already gone: the next W&B call would raise and end the run before it saves.
        # Stop logging to W&B (a list assignment, safe in a handler); what was sent stays.
        trainer = self._trainer
        if trainer is not None:
            trainer.loggers = [lg for lg in trainer.loggers if not _has_service_process(lg)]

    @property
    def active(self) -> bool:
        return bool(self._previous)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning registered its own handlers in Trainer._run, so
        # ours replace them; Lightning restores the pre-fit handlers when fit ends.
        if self.only_under_slurm and not in_slurm_step():
            return
        self._trainer = trainer
        self._previous[self.signum] = signal.signal(self.signum, self._on_warning)
        if self.save_on_sigterm:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        if trainer.is_global_zero:
            log.info("SLURM job %s (restart %s): training from global step %d; SIG%s saves %s and requeues.",
                     slurm_job_id(), os.environ.get("SLURM_RESTART_COUNT", "0"), trainer.global_step,
                     self.signal_name, self.checkpoint_path(trainer))

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        dirpath = self.dirpath
        if dirpath is None and trainer.checkpoint_callback is not None:
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath is None:
            dirpath = Path(trainer.default_root_dir) / "checkpoints"
        return Path(dirpath) / "last.ckpt"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active:
            return
        # Ranks may see the signal a few steps apart: decide together, at the same step.
        if not trainer.strategy.reduce_boolean_decision(self._warned or self._terminated, all=False):
            return
        requeue = self.requeue and trainer.strategy.reduce_boolean_decision(self._warned, all=False)
        path = self.checkpoint_path(trainer)
        cause = f"SIG{self.signal_name}" if requeue or self._warned else "SIGTERM"
        if trainer.is_global_zero:
            log.warning("%s received: saving %s at global step %d.", cause, path, trainer.global_step)
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes; ends with a barrier
        if trainer.is_global_zero:
            log.warning("Saved preemption checkpoint %s at global step %d.", path, trainer.global_step)
        failure = None
        if trainer.is_global_zero:
            self._close_loggers(trainer)
        if requeue and trainer.is_global_zero:
            failure = self._requeue()
        trainer.strategy.barrier("PreemptionCheckpoint.requeued")
        if failure is not None:
            raise failure
        raise Preempted(f"{cause}: checkpoint saved at global step {trainer.global_step}"
                        + ("; job requeued" if requeue else "; exiting"))

    @staticmethod
    def _close_loggers(trainer: pl.Trainer) -> None:
        """Flush loggers before the requeue: Slurm then SIGTERMs every process of the job,
        W&B's service process included, and a W&B run not finished by then loses what it
        had not written yet (seen here: an empty offline run file). The restarted job
        resumes the same W&B run id."""
        for logger in trainer.loggers:
            try:
                logger.save()
                run = getattr(logger, "experiment", None)
                if hasattr(run, "mark_preempting") and hasattr(run, "finish"):
                    run.mark_preempting()
                    run.finish()
            except Exception as error:  # never let logging stop the requeue
                log.warning("Could not close logger %s before requeue: %s", type(logger).__name__, error)

    def _requeue(self) -> BaseException | None:
        """Requeue this job (rank 0). Returns an exception to raise after the barrier
        when submitit refuses (too many timeouts), else None."""
        submitit_handler = self._previous.get(self.signum)
        if getattr(submitit_handler, "__qualname__", "").startswith("SignalHandler."):
            # submitit's own handler: re-pickles the task (counting timeouts), runs
            # `scontrol requeue`, then sys.exit()s; we take over the exit.
            try:
                submitit_handler(self.signum, None)
            except SystemExit:
                return None
            except Exception as error:  # submitit.core.utils.UncompletedJobError
                log.error("Not requeued: %s", error)
                return error
            return None
        job_id = slurm_job_id()
        result = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True)
        if result.returncode != 0:
            log.error("`scontrol requeue %s` failed: %s. Fix: submit with --requeue (the slurm launcher's "
                      "additional_parameters.requeue: true) or ask for JobRequeue=1.", job_id, result.stderr.strip())
        else:
            log.info("Requeued SLURM job %s.", job_id)
        return None
