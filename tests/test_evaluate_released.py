"""A released checkpoint is accepted wherever a checkpoint is: ``evaluate.py`` puts a released
tokenizer (``pretrained:<name>:<path>``) and a run trained here in one report, each row saying
where its weights came from."""
from __future__ import annotations

import csv

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import ROOT
from test_parity_vq import load_fixture, reference_state


def released_file(tmp_path) -> str:
    """A reduced-width LlamaGen VQ-8 file in the released layout (weights under ``model``)."""
    fixture = load_fixture("llamagen_vq8")
    path = tmp_path / "vq_ds8_c2i.pt"
    torch.save({"model": reference_state(fixture)}, path)
    arch = {k: v for k, v in fixture["architecture"].items() if k != "ds"}
    return f"pretrained:llamagen_vq8:{path}" + "".join(f"?{k}:{v}" for k, v in arch.items())


def trained_run(tmp_path) -> tuple[str, dict]:
    """A run directory as train.py leaves it: the run config and raw + EMA weights (different)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke", "tokenizer=vqgan"])
    torch.manual_seed(0)
    tokenizer = instantiate(cfg.tokenizer)
    raw = tokenizer.state_dict()
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in raw.items()}
    state = {**{f"tokenizer.{k}": v for k, v in raw.items()}, **{f"ema.module.{k}": v for k, v in ema.items()}}
    config = {"run_name": "mine", "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
              "data": {"resolution": 32}}
    run = tmp_path / "runs" / "mine"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"config": config, "state_dict": state}, run / "checkpoints" / "last.ckpt")
    return str(run), ema


def test_released_and_trained_checkpoints_in_one_report(tmp_path):
    from evaluation.main import evaluate

    spec = released_file(tmp_path)
    run, ema = trained_run(tmp_path)
    out = tmp_path / "report"
    with initialize_config_dir(str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoints=[{spec},{run}]", "debug=smoke", f"out={out}",
                                             "limit_batches=1", "grid_images=2"])
    results = evaluate(cfg)
    assert [r["run"] for r in results] == ["llamagen_vq8", "mine"]
    assert results[0]["source"] == {"kind": "released", "file": spec.split(":", 2)[2].split("?")[0], "weights": "released"}
    assert results[1]["source"]["kind"] == "trained" and results[1]["source"]["weights"] == "EMA"
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["source"]) for r in rows] == [("llamagen_vq8", "released file (released)"),
                                                        ("mine", "trained here (EMA)")]
    # the trained row was computed with the EMA weights it claims
    from tokenizers.loading import load_tokenizer

    loaded, _ = load_tokenizer(run)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())


def test_init_from_a_released_checkpoint_sets_tokenizer_and_ema_weights(tmp_path):
    """``train.py init_from=pretrained:...``: fine-tuning starts from the released weights."""
    from training.checkpoints import load_weights_into
    from tokenizers.pretrained import llamagen

    fixture = load_fixture("llamagen_vq8")
    spec = released_file(tmp_path)
    arch = {k: v for k, v in fixture["architecture"].items() if k != "ds"}

    class Module(torch.nn.Module):  # what load_weights_into touches of TokenizerModule
        def __init__(self):
            super().__init__()
            self.tokenizer = llamagen.build(8, **arch)
            self.ema = torch.nn.Module()
            self.ema.module = llamagen.build(8, **arch)

    module = Module()
    load_weights_into(module, spec)
    expected = llamagen.load_state(llamagen.build(8, **arch), reference_state(fixture), "fixture").state_dict()
    for target in (module.tokenizer, module.ema.module):
        assert all(torch.equal(target.state_dict()[k], v) for k, v in expected.items())


def test_a_missing_released_file_is_named_with_where_it_is_published(tmp_path):
    from evaluation.main import CheckpointsNotEvaluated, evaluate

    spec = f"pretrained:llamagen_vq16:{tmp_path / 'nowhere'}"
    with initialize_config_dir(str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"checkpoints=[{spec}]", "debug=smoke", f"out={tmp_path / 'report'}"])
    import pytest

    with pytest.raises(CheckpointsNotEvaluated) as error:
        evaluate(cfg)
    message = str(error.value)
    assert "vq_ds16_c2i.pt" in message and "huggingface.co/FoundationVision/LlamaGen" in message
    assert "truncated" not in message
