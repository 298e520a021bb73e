"""Shared test helpers (the tests folder is on sys.path under pytest)."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_train(args: list[str], cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    """Runs ``python train.py ARGS`` as a user would; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
