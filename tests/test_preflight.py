"""Bad configs fail fast, as one message naming the fix, before anything is built."""
import resource
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import ROOT
from training.preflight import ConfigError, check_overrides, preflight, remove_fresh_run_dir

CONF = ROOT / "conf"


def _compose(overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _problem(overrides, monkeypatch=None) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(_compose(overrides))
    return str(info.value)


@pytest.mark.parametrize("overrides", [[], ["debug=smoke"], ["tokenizer=flextok", "debug=smoke"],
                                        ["tokenizer=fqgan_triple", "debug=smoke"], ["trainer=ddp_cpu", "debug=smoke"]])
def test_working_configs_pass(overrides):
    preflight(_compose(overrides))


def test_shard_data_without_root_names_the_shard_writer():
    message = _problem(["data=imagenet"])
    assert "data.root" in message and "python -m data.shards" in message


def test_shard_root_without_matching_shards(tmp_path):
    message = _problem(["data=imagenet", f"data.root={tmp_path}"])
    assert "No training shards match" in message and "data.train_shards" in message


@pytest.mark.parametrize("overrides, names", [
    (["debug=smoke", "data.resolution=34"], "data.resolution=34 is not a multiple of the tokenizer's downsample factor 4"),
    (["debug=smoke", "tokenizer.quantizer.codebook_size=0"], "tokenizer.quantizer.codebook_size=0"),
    (["debug=smoke", "tokenizer=flextok", "tokenizer.fsq_levels=[]"], "tokenizer.fsq_levels=[]"),
    (["debug=smoke", "data.batch_size=1000"], "larger than the 768 training images"),
    (["debug=smoke", "data.batch_size=100000000"], "GiB"),
    (["debug=smoke", "init_from=/nonexistent/run"], "init_from=/nonexistent/run does not exist"),
    (["experiment=vavae_stage2", "debug=smoke"], "init_from is not set"),
    (["debug=smoke", "loss.perceptual.weights=/nonexistent/vgg.pth"], "loss.perceptual.weights=/nonexistent/vgg.pth"),
])
def test_bad_values_are_named_with_their_fix(overrides, names):
    message = _problem(overrides)
    assert names in message and "Fix" in message


def test_gpu_trainer_on_a_machine_without_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi either
    assert "asks for 8 GPU(s), this machine has none" in _problem(["trainer=ddp"])


def test_checkpoint_of_another_tokenizer_is_refused(tmp_path):
    ckpt = tmp_path / "vae.ckpt"
    torch.save({"config": {"tokenizer": {"_target_": "tokenizers.vae.AutoencoderKL"}}, "state_dict": {}}, ckpt)
    message = _problem(["debug=smoke", f"ckpt_path={ckpt}"])
    assert "holds a AutoencoderKL checkpoint, but this run trains VQGAN" in message
    preflight(_compose(["debug=smoke", "tokenizer=vae", f"ckpt_path={ckpt}"]))  # the right tokenizer passes


def test_all_problems_come_in_one_message():
    message = _problem(["debug=smoke", "data.resolution=34", "tokenizer.quantizer.codebook_size=0"])
    assert "codebook_size=0" in message and "data.resolution=34" in message


@pytest.mark.parametrize("argv, expected", [
    (["trainer.max_step=10"], "Did you mean trainer.max_steps?"),
    (["max_steps=10"], "Did you mean trainer.max_steps?"),
    (["debug=smoke", "data.batchsize=4"], "Did you mean data.batch_size?"),
    (["tokenizr=vqgan"], "Did you mean tokenizer?"),
    (["tokenizer=vqgna"], "Did you mean tokenizer=vqgan?"),
])
def test_unknown_key_gets_the_closest_real_key(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        check_overrides(CONF, "train", argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_evaluate_keys_get_the_closest_real_key_too(capsys):
    with pytest.raises(SystemExit):
        check_overrides(CONF / "evaluate", "evaluate", ["checkpoints=[a]", "limit_batch=3"])
    err = capsys.readouterr().err
    assert "Did you mean limit_batches?" in err and "python evaluate.py --cfg job" in err


def test_known_keys_and_sweeps_pass_the_key_check():
    check_overrides(CONF, "train", ["debug=smoke", "trainer.max_steps=3", "tokenizer=vqgan,vae", "+foo=1"])


def test_run_dir_with_checkpoints_is_never_removed(tmp_path):
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    for d in (fresh, used):
        (d / ".hydra").mkdir(parents=True)
        (d / "train.log").write_text("")
    (used / "checkpoints").mkdir()
    assert remove_fresh_run_dir(fresh) and not fresh.exists()
    assert not remove_fresh_run_dir(used) and (used / "checkpoints").is_dir()


def test_bad_command_fails_in_seconds_without_traceback_or_run_dir(tmp_path):
    run = tmp_path / "run"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, "train.py", "data=imagenet", f"hydra.run.dir={run}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds, not wall time: on a shared machine the wall clock measures the other jobs
    # (before the preflight this command took 7 CPU seconds: torch, the model, then the error)
    elapsed = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert p.returncode == 2
    assert "data.root" in p.stderr and "python -m data.shards" in p.stderr
    assert "Traceback" not in p.stderr
    assert not run.exists()
    assert elapsed < 5, f"{elapsed:.1f} CPU s from the command to its error"


def test_debug_flag_shows_the_traceback_instead(monkeypatch, tmp_path):
    from training.preflight import fail

    monkeypatch.setenv("TOKBENCH_DEBUG", "1")
    with pytest.raises(ConfigError, match="the message"):
        fail(ConfigError("the message"), tmp_path / "absent")
    monkeypatch.delenv("TOKBENCH_DEBUG")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit):
        fail(ConfigError("the message"), tmp_path / "absent")
