"""A resume brings back the whole training state, tensor by tensor: tokenizer and EMA
weights, discriminator weights and BatchNorm statistics, both optimizers' state, the
step, and the W&B run id; ``ckpt_path`` (file or run directory) and ``resume=auto`` are
what decide it. Checked against the live state at save time (not against the file, which
a broken save would share), and against an uninterrupted run."""
from __future__ import annotations

import torch

from inprocess import (
    Probe,
    StateAtTrainStart,
    assert_same,
    repeated_batches,
    tiny_module,
    trainer,
    train_in_process,
    training_state,
)


def _train_and_save(tmp_path, steps: int):
    module = tiny_module(seed=0)
    t = trainer(steps)
    t.fit(module, train_dataloaders=repeated_batches())
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    return path, training_state(t, module)


def test_every_tensor_of_the_training_state_is_restored_on_resume(tmp_path):
    path, saved = _train_and_save(tmp_path, steps=3)
    assert saved["step"] == 3 and len(saved["optimizers"]) == 2
    assert saved["optimizers"][1]["state"], "the discriminator optimizer has state to restore"

    probe = StateAtTrainStart()
    fresh = tiny_module(seed=1)  # other initial weights: a missed restore shows
    t = trainer(4, callbacks=[probe])
    t.fit(fresh, train_dataloaders=repeated_batches(), ckpt_path=str(path))

    restored = probe.state
    assert_same(saved["module"], restored["module"], "module")  # tokenizer, ema.module, discriminator + BN
    assert_same(saved["ema"], restored["ema"], "ema")
    assert_same(saved["optimizers"][0], restored["optimizers"][0], "tokenizer optimizer")
    assert_same(saved["optimizers"][1], restored["optimizers"][1], "discriminator optimizer")
    assert restored["step"] == 3


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(tmp_path):
    # every batch is the same, so only the restored state can make the two runs differ
    path, _ = _train_and_save(tmp_path, steps=3)
    resumed = tiny_module(seed=1)
    t_resumed = trainer(5)
    t_resumed.fit(resumed, train_dataloaders=repeated_batches(), ckpt_path=str(path))

    straight = tiny_module(seed=0)
    t_straight = trainer(5)
    t_straight.fit(straight, train_dataloaders=repeated_batches())

    assert t_resumed.global_step == t_straight.global_step == 5
    assert_same(training_state(t_straight, straight), training_state(t_resumed, resumed))


# -- through train(cfg): ckpt_path and resume=auto -------------------------------------------
def _checkpoint_state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt, ckpt["state_dict"]


def test_ckpt_path_to_a_run_directory_resumes_that_runs_state(tmp_path):
    first = tmp_path / "first"
    train_in_process(first, ["trainer.max_steps=2"])
    saved, saved_weights = _checkpoint_state(first / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 2

    train_in_process(tmp_path / "second", ["trainer.max_steps=3", f"ckpt_path={first}"], probe=True)
    state = Probe.last.state
    assert state["step"] == 2  # continued from the saved step, not from 0
    assert_same({k: saved_weights[k] for k in state["module"]}, state["module"], "module")
    assert_same(saved["optimizer_states"][0]["state"], state["optimizers"][0]["state"], "optimizer")
    assert_same(saved["optimizer_states"][1]["state"], state["optimizers"][1]["state"], "disc optimizer")
    final, _ = _checkpoint_state(tmp_path / "second" / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 3


def test_ckpt_path_to_a_checkpoint_file_resumes_it(tmp_path):
    first = tmp_path / "first"
    train_in_process(first, ["trainer.max_steps=2"])
    _, saved_weights = _checkpoint_state(first / "checkpoints" / "last.ckpt")
    train_in_process(tmp_path / "second", ["trainer.max_steps=3", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"],
                     probe=True)
    assert Probe.last.state["step"] == 2
    assert torch.equal(Probe.last.state["module"]["ema.module.decoder.conv_out.weight"],
                       saved_weights["ema.module.decoder.conv_out.weight"])


def test_rerunning_in_the_same_directory_resumes_and_resume_never_starts_over(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, ["trainer.max_steps=2"])
    _, saved_weights = _checkpoint_state(run / "checkpoints" / "last.ckpt")

    train_in_process(run, ["trainer.max_steps=3"], probe=True)  # resume=auto (the default)
    assert Probe.last.state["step"] == 2
    assert torch.equal(Probe.last.state["module"]["tokenizer.quantizer.embedding.weight"],
                       saved_weights["tokenizer.quantizer.embedding.weight"])

    train_in_process(run, ["trainer.max_steps=1", "resume=never"], probe=True)
    assert Probe.last.state["step"] == 0
    assert int(Probe.last.state["module"]["ema.num_updates"]) == 0


def test_a_resumed_run_keeps_its_wandb_run_id(tmp_path, monkeypatch):
    from common import loggers

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    first = loggers.wandb_logger(save_dir=str(run), name="a")
    again = loggers.wandb_logger(save_dir=str(run), name="a")
    other = loggers.wandb_logger(save_dir=str(tmp_path / "other"), name="a")
    assert first._wandb_init["id"] == again._wandb_init["id"] != other._wandb_init["id"]
    assert again._wandb_init["resume"] == "allow"
