"""One run per run directory.

Two ``train.py`` started on the same run directory (a resubmitted job while the first
still runs, a copy-pasted command) would resume from each other's checkpoints, write the
same temporary checkpoint file and interleave their logs. The first run holds an
exclusive ``flock`` on ``<run dir>/.run.lock`` for as long as it trains; a second one
refuses to start and names the holder. The kernel drops the lock when the holding
process ends in any way (``kill -9``, a crash, a node lost on a network file system), so
a crashed run never leaves the directory locked: the next start resumes normally.

Only the process that starts the run takes the lock: the other ranks of a DDP job
(started by Lightning, torchrun, srun or submitit, all of which mark them in the
environment) share the directory by design.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from training.preflight import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"

# Set to a non-zero rank in every process that is not the one starting the run.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID")


class RunDirectoryInUse(ConfigError):
    """Another live run holds the directory (train.py prints the message, no traceback)."""


def starts_the_run(environ=os.environ) -> bool:
    """This process is global rank 0 (or a single-process run)."""
    return all(environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


def lock_is_held(run_dir: str | os.PathLike) -> bool:
    """Whether a live process holds ``<run_dir>/.run.lock`` now (this one included)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def run_directory_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Holds ``<run_dir>/.run.lock`` for the duration; raises ``RunDirectoryInUse`` at once
    when another live process holds it."""
    if not starts_the_run():
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.seek(0)
            holder = handle.read().strip() or "holder unknown"
            handle.close()
            raise RunDirectoryInUse(
                f"Run directory {Path(run_dir)} is in use by another run ({holder}). Two runs on one directory "
                "would overwrite each other's checkpoints and logs. Fix: wait for that run to end (or stop it), "
                "or start this one in another directory (hydra.run.dir=...). A crashed run does not hold the "
                f"lock ({path} is released when its process ends)."
            ) from None
        # e.g. ENOLCK / EOPNOTSUPP on a file system without locks: train, but say so
        log.warning("Could not lock %s (%s): a second run on this directory would not be stopped.", path, error)
        handle.close()
        yield
        return
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
