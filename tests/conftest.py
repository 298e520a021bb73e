import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project runs from the repository root, never installed

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# The tests' models are tiny: one intra-op thread is as fast as two on an idle 2-core
# machine, and on a loaded one two OpenMP threads spin (tests/test_module.py: 81 s of CPU
# with 2 threads, 8 s with 1, measured with 8 other sessions running).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # demo shards and other caches go to a per-session temp dir, not the user's home
    cache = tmp_path_factory.getbasetemp() / "tokbench_cache"
    monkeypatch.setenv("TOKBENCH_CACHE", str(cache))
    yield


