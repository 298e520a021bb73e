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


