"""Evaluation output: a fresh folder, portable paths, smoke plots that say so on themselves."""
import json
import os

import matplotlib.figure
import pytest
from hydra import compose, initialize_config_dir

from evaluation import plots, report
from evaluation.main import evaluate, smoke_note
from helpers import ROOT

RESULT = {"run": "tiny", "rows": [{"bits_per_image": 16, "psnr": 10.0, "rfid": 1.0, "num_tokens": 4}],
          "facts": {"discrete": True, "family": "VQGAN", "codebook_sizes": [4], "token_shape": [2, 2]},
          "conventions": {"LPIPS": "vgg16"}}


def _evaluate_cfg(overrides):
    with initialize_config_dir(str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def _texts_on_saved_figures(monkeypatch):
    seen = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        seen.append(" ".join(t.get_text() for t in fig.texts))
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return seen


def test_plots_made_with_random_feature_networks_say_so_on_the_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    note = smoke_note(_evaluate_cfg(["debug=smoke"]), [RESULT])
    assert note and "random feature networks" in note
    assert smoke_note(_evaluate_cfg([]), [RESULT]) is None
    seen = _texts_on_saved_figures(monkeypatch)
    plots.rate_distortion([RESULT], tmp_path / "with.png", note)
    plots.rate_distortion([RESULT], tmp_path / "without.png", None)
    assert note in seen[0] and note not in seen[1]


def test_report_shows_checkpoints_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = {**RESULT, "checkpoint": str(tmp_path / "logs" / "a" / "checkpoints" / "last.ckpt"),
              "source": {"kind": "trained", "file": str(tmp_path / "logs" / "a" / "checkpoints" / "last.ckpt")}}
    report.write_json(result, tmp_path / "a.json")
    monkeypatch.setattr(report, "markdown_table", lambda results: "")  # the table is not about paths
    report.write_markdown([result], tmp_path / "report.md", {}, [])
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["checkpoint"] == saved["source"]["file"] == os.path.join("logs", "a", "checkpoints", "last.ckpt")
    assert str(tmp_path) not in (tmp_path / "report.md").read_text()


def test_evaluate_refuses_an_out_folder_that_holds_a_report(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "report.md").write_text("kept")
    cfg = _evaluate_cfg(["checkpoints=[/nonexistent]", f"out={tmp_path}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(FileExistsError, match="overwrite=true"):
        evaluate(cfg)
    assert (tmp_path / "report.md").read_text() == "kept"


def test_committed_sample_report_holds_no_absolute_paths():
    for path in (ROOT / "docs" / "sample_report").glob("*"):
        if path.suffix in (".md", ".json", ".csv"):
            text = path.read_text()
            assert not any(marker in text for marker in ("/work/", "/tmp/", "/home/", "/root/")), path.name


def test_evaluation_shows_progress_over_checkpoints_and_their_batches(tmp_path, monkeypatch):
    import evaluation.main as main
    from omegaconf import OmegaConf

    monkeypatch.chdir(ROOT)
    bars = []
    real_progress = main.progress

    def recording(iterable, desc, **kwargs):
        bar = real_progress(iterable, desc, **kwargs)
        bars.append((desc, bar.total))
        return bar

    class Stop(Exception):
        pass

    def first_batches_then_stop(tokenizer, batches, **kwargs):
        next(iter(batches))
        raise Stop

    monkeypatch.setattr(main, "progress", recording)
    monkeypatch.setattr(main, "resolve_checkpoint", lambda p: p)
    monkeypatch.setattr(main, "load_tokenizer", lambda p, ema: (object(), OmegaConf.create({"run_name": p})))
    monkeypatch.setattr(main, "first_images", lambda batches, n: None)
    monkeypatch.setattr(main, "evaluate_tokenizer", first_batches_then_stop)
    cfg = _evaluate_cfg(["checkpoints=[a,b]", "data=synthetic", "data.num_val=12", "data.batch_size=4",
                         f"out={tmp_path}", f"paths.output_dir={tmp_path}", "debug=smoke", "limit_batches=null"])
    with pytest.raises(Stop):
        evaluate(cfg)
    assert bars == [("checkpoints", 2), ("a", 3)]  # 12 validation images in batches of 4


def test_readme_evaluation_commands_write_to_untracked_folders():
    import re
    import subprocess

    readme = (ROOT / "README.md").read_text()
    outs = re.findall(r"python evaluate\.py[^`]*?\bout=(\S+)", readme, flags=re.S)
    assert outs
    for out in outs:
        tracked = subprocess.run(["git", "ls-files", out], cwd=ROOT, capture_output=True, text=True).stdout
        assert not tracked and not out.startswith("docs"), f"README evaluates into tracked files: out={out}"
