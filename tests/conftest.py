import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project runs from the repository root, never installed

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # demo shards and other caches go to a per-session temp dir, not the user's home
    cache = tmp_path_factory.getbasetemp() / "tokbench_cache"
    monkeypatch.setenv("TOKBENCH_CACHE", str(cache))
    yield


def run_train(args: list[str], cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    """Runs ``python train.py ARGS`` as a user would; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
