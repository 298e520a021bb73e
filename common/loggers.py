"""Experiment loggers. W&B decides online/offline by itself; the run id is kept in the
run directory so a resumed or requeued run continues the same W&B run. The CSV logger
appends to the run's ``metrics.csv`` on resume instead of starting it over."""
from __future__ import annotations

import csv
import logging
import netrc
import os
import secrets
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.path.expanduser("~/.netrc"))
        if any(host in rc.hosts for host in ("api.wandb.ai", "wandb.ai")):
            return True
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    settings = Path(os.environ.get("WANDB_CONFIG_DIR", "~/.config/wandb")).expanduser() / "settings"
    return settings.is_file() and "api_key" in settings.read_text(errors="ignore")


def wandb_mode() -> str:
    """``WANDB_MODE`` set by the user always wins; else online with credentials, offline without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_present() else "offline"


def persistent_run_id(save_dir: str | os.PathLike) -> str:
    """The W&B run id of this run directory, created once (by rank 0) and reused after a
    resume or requeue."""
    path = Path(save_dir) / "wandb_run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids are short lowercase strings; wandb 0.31 dropped wandb.util.generate_id
    # submitit's local launcher starts every task as its own "rank 0" before DDP is up
    rank = int(os.environ.get("SUBMITIT_LOCAL_GLOBALID", rank_zero_only.rank))
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id)
        os.replace(tmp, path)
    return run_id


def wandb_logger(save_dir: str, project: str = "tokbench", name: str | None = None, group: str | None = None,
                 tags: list | None = None, log_model: bool = False, **kwargs):
    from pytorch_lightning.loggers import WandbLogger

    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]  # an empty value is not a mode; wandb would reject it
    mode = wandb_mode()
    if mode == "offline" and not os.environ.get("WANDB_MODE"):
        rank_zero_only(log.warning)(
            "W&B: no credentials found; logging offline to %s/wandb (sync later with `wandb sync`).", save_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, project=project, name=name, group=group, tags=list(tags or []),
                       id=persistent_run_id(save_dir), resume="allow", mode=mode, log_model=log_model, **kwargs)


def finish_loggers(loggers, failed: bool = False) -> None:
    """Close the W&B run explicitly: left to the interpreter's exit, wandb 0.31 abandons
    its pending requests and writes a HandleAbandonedError traceback into its debug log."""
    for logger in loggers:
        run = getattr(logger, "_experiment", None)  # None: never started (or not W&B)
        if run is not None and hasattr(run, "finish") and rank_zero_only.rank == 0:
            run.finish(exit_code=1 if failed else 0)


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued (its
    columns kept, new ones added by rewriting the header) instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(next(csv.reader(handle), []))


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume: a resumed or requeued run
    appends its rows, so the file holds the whole history (steps logged after the last
    checkpoint by a killed run appear again when the resumed run repeats them). Lightning
    writes the rows at every logging step, so a killed run's file is complete up to its last one."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment
