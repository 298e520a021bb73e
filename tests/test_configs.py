"""Every config option composes: experiments, tokenizers at every scale, debug modes."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from helpers import ROOT

CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TOKENIZERS = sorted(p.stem for p in (CONF / "tokenizer").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.module._target_ == "training.module.TokenizerModule"
    target = cfg.tokenizer._target_ if "tokenizer" in cfg else None
    assert target or cfg.get("task") == "generator"


@pytest.mark.parametrize("scale", ["demo", "smoke", "reference"])
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_every_tokenizer_has_every_scale(tokenizer, scale):
    cfg = _compose([f"tokenizer={tokenizer}", f"scale={scale}"])
    assert cfg.tokenizer._target_.startswith("tokenizers.")
    if scale != "reference":  # the scale files exist and shrink the model
        assert (CONF / "tokenizer_scale" / f"{tokenizer}_{scale}.yaml").is_file()


def test_smoke_uses_random_teachers_and_tiny_images():
    cfg = _compose(["tokenizer=fqgan_triple", "debug=smoke"])
    assert cfg.teacher.random is True
    assert all(b.teacher.random for b in cfg.tokenizer.branches.values() if "teacher" in b)
    assert cfg.data.resolution == 32 and cfg.trainer.max_steps <= 10
