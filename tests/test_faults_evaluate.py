"""Fault table (docs/faults.md): evaluate with a missing and a truncated checkpoint among
good ones: the good ones are reported, the bad ones named in the report and in the error."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from helpers import ROOT
from test_generator import tiny_tokenizer_checkpoint


def test_a_missing_and_a_truncated_checkpoint_are_named_and_the_good_one_is_still_reported(tmp_path, monkeypatch):
    from evaluation.main import CheckpointsNotEvaluated, evaluate

    monkeypatch.chdir(ROOT)
    good = tiny_tokenizer_checkpoint(tmp_path / "good.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])  # a copy cut short (a full disk, an interrupted scp)
    missing = tmp_path / "no_such_run"
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "debug=smoke", "data.resolution=16", f"checkpoints=[{missing},{good},{truncated}]",
            f"out={tmp_path / 'report'}", f"paths.output_dir={tmp_path / 'eval'}", "limit_batches=1",
            "grid_images=2", "logger={}",
        ])
    with pytest.raises(CheckpointsNotEvaluated) as error:
        evaluate(cfg)
    message = str(error.value)
    assert str(missing) in message and str(truncated) in message and str(good) not in message
    assert [r["checkpoint"] for r in error.value.results] == [str(good.resolve())]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "tiny_vq" in report and str(missing) in report and str(truncated) in report
    assert json.loads((tmp_path / "report" / "tiny_vq.json").read_text())["checkpoint"] == str(good.resolve())


@pytest.mark.slow
def test_evaluate_py_names_the_bad_checkpoints_without_a_traceback(tmp_path):
    import subprocess
    import sys

    good = tiny_tokenizer_checkpoint(tmp_path / "good.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    p = subprocess.run(
        [sys.executable, "evaluate.py", "debug=smoke", "data.resolution=16", f"checkpoints=[{good},{truncated}]",
         f"out={tmp_path / 'report'}", f"hydra.run.dir={tmp_path / 'eval'}", "limit_batches=1", "grid_images=2",
         "logger={}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1
    assert f"{truncated}: cannot be loaded" in p.stderr and "truncated or not a checkpoint" in p.stderr
    assert "Traceback" not in p.stderr
    assert (tmp_path / "report" / "tiny_vq.json").is_file()
