"""Config values of the training loop reach the code that uses them: change the value,
see the effect. Optimizer lr / betas / weight decay (tokenizer and discriminator apart),
gradient clipping, EMA decay, ``disc_start``."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from inprocess import compose_train, images, repeated_batches, tiny_module, train_in_process, trainer
from common.ema import EMA


def _built(tmp_path, *overrides):
    from training.run import build_module

    cfg = compose_train(tmp_path, ["debug=smoke", "loss.perceptual=null", "logger=none", *overrides])
    return build_module(cfg)


def test_optimizer_settings_from_the_config_reach_each_optimizer(tmp_path):
    module = _built(tmp_path, "module.optimizer.lr=0.0123", "module.optimizer.betas=[0.3,0.4]",
                    "module.optimizer.weight_decay=0.05", "module.disc_optimizer.lr=0.0456",
                    "module.disc_optimizer.betas=[0.1,0.2]")
    opt_g, opt_d = module.configure_optimizers()
    (g,), (d,) = opt_g.param_groups, opt_d.param_groups
    assert (g["lr"], tuple(g["betas"]), g["weight_decay"]) == (0.0123, (0.3, 0.4), 0.05)
    assert (d["lr"], tuple(d["betas"])) == (0.0456, (0.1, 0.2))
    # each optimizer holds exactly its own model's trainable parameters (not the EMA copy)
    assert {id(p) for p in g["params"]} == {id(p) for p in module.tokenizer.parameters() if p.requires_grad}
    assert {id(p) for p in d["params"]} == {id(p) for p in module.gan.discriminator.parameters()}


def test_ema_decay_and_grad_clip_from_the_config_reach_the_module(tmp_path):
    module = _built(tmp_path, "module.ema_decay=0.77", "module.grad_clip=0.5", "module.disc_grad_clip=0.25")
    assert module.ema.decay == 0.77 and module.grad_clip == 0.5 and module.disc_grad_clip == 0.25


def _one_sgd_step(clip, disc_clip=None):
    """One training step with plain SGD at lr 1: the weight change is the (clipped) gradient."""
    module = tiny_module(seed=0, optimizer=partial(torch.optim.SGD, lr=1.0), grad_clip=clip, disc_grad_clip=disc_clip)
    tok0 = torch.cat([p.detach().flatten().clone() for p in module.tokenizer.parameters()])
    disc0 = torch.cat([p.detach().flatten().clone() for p in module.gan.discriminator.parameters()])
    trainer(1).fit(module, train_dataloaders=repeated_batches())
    tok1 = torch.cat([p.detach().flatten() for p in module.tokenizer.parameters()])
    disc1 = torch.cat([p.detach().flatten() for p in module.gan.discriminator.parameters()])
    return float((tok1 - tok0).norm()), float((disc1 - disc0).norm())


def test_gradients_are_clipped_to_the_configured_norm():
    free_g, free_d = _one_sgd_step(clip=None, disc_clip=None)
    clipped_g, clipped_d = _one_sgd_step(clip=1e-3, disc_clip=2e-3)
    assert free_g > 1e-2 and free_d > 1e-2  # unclipped steps are far larger than the clips
    assert clipped_g == pytest.approx(1e-3, rel=1e-3)
    assert clipped_d == pytest.approx(2e-3, rel=1e-3)


def test_ema_update_is_the_configured_decay_after_warm_up():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.6)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.num_updates.fill_(1000)  # warm-up over: d = min(0.6, 1001 / 1010) = 0.6
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.6 * start + 0.4 * model.weight)
    fresh = EMA(model, decay=0.6)
    before = fresh.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    fresh.update(model)  # first update: d = min(0.6, 1 / 10) = 0.1
    torch.testing.assert_close(fresh.module.weight, 0.1 * before + 0.9 * model.weight)
    assert int(fresh.num_updates) == 1


def test_each_training_step_moves_the_ema_copy_towards_the_new_weights():
    module = tiny_module(seed=0, ema_decay=0.5)
    module.ema.num_updates.fill_(100)  # decay 0.5 from the first step on
    ema_before = {n: p.detach().clone() for n, p in module.ema.module.named_parameters()}
    trainer(1).fit(module, train_dataloaders=repeated_batches())
    for name, p in module.tokenizer.named_parameters():
        expected = 0.5 * ema_before[name] + 0.5 * p.detach()
        torch.testing.assert_close(dict(module.ema.module.named_parameters())[name], expected, msg=name)
    assert int(module.ema.num_updates) == 101


def test_disc_start_from_the_config_gates_the_discriminator_updates(tmp_path):
    import pytorch_lightning as pl

    def disc_after(disc_start, run):
        train_in_process(run, ["trainer.max_steps=2", f"gan.disc_start={disc_start}"])
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        return {k: v for k, v in state.items() if k.startswith("gan.discriminator.") and v.is_floating_point()}

    # the initial discriminator: train() seeds with cfg.seed before building the module
    from training.run import build_module

    pl.seed_everything(0)
    from inprocess import FAST_RUN

    initial = build_module(compose_train(tmp_path / "init", [*FAST_RUN, "gan.disc_start=2"])).state_dict()
    untouched = disc_after(2, tmp_path / "late")
    assert all(torch.equal(v, initial[k]) for k, v in untouched.items())
    trained = disc_after(1, tmp_path / "early")
    assert any(not torch.equal(v, initial[k]) for k, v in trained.items() if k.endswith("weight"))
