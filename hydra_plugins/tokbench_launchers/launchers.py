"""``hydra/launcher=slurm`` and ``hydra/launcher=local``: hydra-submitit-launcher's
launchers with three additions, all on the submitting side, before anything runs:

1. every job of the sweep is composed and its shape checked against its own trainer
   (``tasks_per_node == trainer.devices``, ``nodes == trainer.num_nodes``, enough GPUs);
   one wrong job refuses the whole sweep with a message naming the keys to fix;
2. ``gpus_per_node: auto``: ``trainer.devices`` GPUs when the trainer uses GPUs, none
   for ``accelerator: cpu``;
3. one W&B group per sweep (``logger.wandb.group``, unless set), passed to each job as an
   override so that every rank and every requeued part of a job sees the same value.

Hydra loads launcher classes only from the ``hydra_plugins`` namespace package, which is
why this lives here and not in ``training/``. It imports neither torch nor Lightning:
Hydra imports it at every start-up. The code running inside the jobs (signal handling,
ranks) is ``training/slurm.py``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocalLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher

log = logging.getLogger(__name__)


class LauncherConfigError(ValueError):
    """The launcher's job shape does not match the trainer config."""


def count_devices(devices: Any) -> int | None:
    """Processes per node for a ``trainer.devices`` value; None when it does not say
    (``auto``, ``-1``)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, str):
        text = devices.strip()
        if text.isdigit():
            return int(text) or None
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(parts) > 1 and all(p.isdigit() for p in parts):
            return len(parts)  # "0,1,3": explicit device indices
        return None
    if isinstance(devices, Sequence):
        return len(devices)
    return None


def uses_gpus(trainer: Mapping) -> bool:
    # accelerator "auto" picks GPUs on a GPU node, so it asks for them too
    return str(trainer.get("accelerator", "auto")).lower() != "cpu"


def job_shape(launcher: Mapping, trainer: Mapping, job: str = "") -> dict[str, int | None]:
    """``{"tasks_per_node", "nodes", "gpus_per_node"}`` to submit for a job, checked
    against its trainer config. Raises :class:`LauncherConfigError` naming the fix."""
    where = f" (job {job})" if job else ""
    devices = count_devices(trainer.get("devices", 1))
    if devices is None:
        raise LauncherConfigError(
            f"trainer.devices={trainer.get('devices')!r}{where} cannot size a cluster job: it must say how many "
            "processes run on each node. Fix: set an explicit count, e.g. trainer.devices=8.")
    num_nodes = int(trainer.get("num_nodes", 1))
    tasks, nodes = launcher.get("tasks_per_node"), launcher.get("nodes")
    if tasks is None or int(tasks) != devices:
        raise LauncherConfigError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}{where}. Lightning runs one process "
            "per device and each Slurm task is one process, so the two must be equal. Fix: leave "
            "hydra.launcher.tasks_per_node at its default ${trainer.devices} (do not sweep trainer.devices within "
            "one sweep), or set both to the same value.")
    if nodes is None or int(nodes) != num_nodes:
        raise LauncherConfigError(
            f"hydra.launcher.nodes={nodes} but trainer.num_nodes={num_nodes}{where}; they must be equal. Fix: leave "
            "hydra.launcher.nodes at its default ${trainer.num_nodes}, or set both to the same value.")
    gpus = launcher.get("gpus_per_node", "auto")
    if gpus is None or gpus == "auto":
        gpus = devices if uses_gpus(trainer) else None
    else:
        gpus = int(gpus)
        if uses_gpus(trainer) and gpus < devices:
            raise LauncherConfigError(
                f"hydra.launcher.gpus_per_node={gpus} but trainer.devices={devices} on accelerator "
                f"{trainer.get('accelerator')!r}{where}: every process needs its own GPU. Fix: "
                "hydra.launcher.gpus_per_node=auto, or trainer=cpu / trainer=ddp_cpu for a CPU job.")
        gpus = gpus or None
    return {"tasks_per_node": devices, "nodes": num_nodes, "gpus_per_node": gpus}


def sweep_group_name(config: Any) -> str:
    """``<task_name>-<sweep directory name>``, e.g. ``train-2026-11-22_01-02-03``."""
    return f"{config.get('task_name', 'sweep')}-{Path(str(config.hydra.sweep.dir)).name}"


class _SacctOnce(logging.Filter):
    """Without Slurm accounting (no slurmdbd) submitit logs "Bypassing sacct error" on
    every status poll. Keep the first, saying what it means, and drop the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = (record.getMessage() + " -- this cluster has no Slurm accounting; submitit falls back to "
                      "the jobs' result files. Further sacct warnings are hidden.")
        record.args = ()
        return True


class _CheckedLaunch:
    """Shared by both launchers (mixed in before hydra-submitit's classes)."""

    def _take_gpus_request(self) -> None:
        # submitit wants an int or None; "auto" is resolved per sweep in launch()
        self._gpus_request = self.params.get("gpus_per_node", "auto")
        self.params["gpus_per_node"] = None

    def launch(self, job_overrides, initial_job_idx):
        loader = self.hydra_context.config_loader
        configs, shapes = [], {}
        for idx, overrides in enumerate(job_overrides):
            cfg = loader.load_sweep_config(self.config, list(overrides))
            configs.append(cfg)
            # ${trainer.devices} / ${trainer.num_nodes} in the launcher config were resolved
            # once, for the whole sweep, when Hydra built this launcher: self.params is what
            # gets submitted, so that is what each job's own trainer is compared with.
            launcher = {"tasks_per_node": self.params.get("tasks_per_node"), "nodes": self.params.get("nodes"),
                        "gpus_per_node": self._gpus_request}
            shape = job_shape(launcher, cfg.trainer, job=f"#{initial_job_idx + idx}: {' '.join(overrides)}")
            shapes[tuple(sorted(shape.items()))] = shape
        if len(shapes) > 1:
            raise LauncherConfigError(
                "The jobs of this sweep need different shapes (" + "; ".join(map(str, shapes.values()))
                + "), but a sweep is submitted as one array job with one shape. Fix: run one sweep per "
                "trainer.devices / trainer.num_nodes / accelerator.")
        (shape,) = shapes.values()
        self.params["gpus_per_node"] = shape["gpus_per_node"]
        job_overrides = [list(o) + self._group_override(cfg) for o, cfg in zip(job_overrides, configs)]
        logging.getLogger("submitit").addFilter(_SacctOnce())
        return super().launch(job_overrides, initial_job_idx)

    def _group_override(self, cfg) -> list[str]:
        logger = cfg.get("logger") or {}
        wandb = logger.get("wandb") if isinstance(logger, Mapping) else None
        if not isinstance(wandb, Mapping) or "group" not in wandb or wandb.get("group") is not None:
            return []
        return [f"logger.wandb.group={sweep_group_name(self.config)}"]


class SlurmLauncher(_CheckedLaunch, _SubmititSlurmLauncher):
    """``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml). The config has no
    schema: any parameter of submitit's SLURM executor may be added (``srun_args``,
    ``exclusive``, ``mail_user`` ...)."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._take_gpus_request()


class LocalLauncher(_CheckedLaunch, _SubmititLocalLauncher):
    """``hydra/launcher=local`` (conf/hydra/launcher/local.yaml): submitit's local
    executor, one process per device; ranks through
    ``training.slurm.SubmititLocalEnvironment``."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._take_gpus_request()
