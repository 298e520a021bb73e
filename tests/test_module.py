"""The training loop: step counting, discriminator schedule, adaptive weight, EMA, NaN guard."""
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tokenizers.conv import Decoder, Encoder
from tokenizers.gan import NLayerDiscriminator, PatchGANHinge
from tokenizers.losses import ReconstructionLoss
from tokenizers.quantizers import VectorQuantizer
from tokenizers.vqgan import VQGAN
from training.module import TokenizerModule, adaptive_weight


def tiny_vqgan():
    return VQGAN(Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=8),
                 Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=8),
                 VectorQuantizer(codebook_size=32, code_dim=4))


class CountingGAN(PatchGANHinge):
    def __init__(self, **kw):
        super().__init__(NLayerDiscriminator(ndf=4, n_layers=1), **kw)
        self.disc_steps: list[int] = []

    def discriminator_loss(self, real, fake, step=None):
        self.disc_steps.append(step)
        return super().discriminator_loss(real, fake, step)


def loader(n=12, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=2)


def fit(module, max_steps, **trainer_kw):
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **trainer_kw)
    trainer.fit(module, train_dataloaders=loader())
    return trainer


def test_global_step_equals_batches_seen_with_two_optimizers():
    gan = CountingGAN(disc_start=0)
    module = TokenizerModule(tiny_vqgan(), ReconstructionLoss(perceptual_weight=0), gan)
    trainer = fit(module, max_steps=9)
    assert trainer.global_step == 9
    assert len(gan.disc_steps) == 9  # the discriminator stepped once per batch


def test_discriminator_starts_at_disc_start():
    gan = CountingGAN(disc_start=4)
    fit(TokenizerModule(tiny_vqgan(), ReconstructionLoss(perceptual_weight=0), gan), max_steps=7)
    assert gan.disc_steps == [4, 5, 6]


def test_discriminator_weights_do_not_move_before_disc_start():
    gan = CountingGAN(disc_start=100)
    before = [p.clone() for p in gan.discriminator.parameters()]
    fit(TokenizerModule(tiny_vqgan(), ReconstructionLoss(perceptual_weight=0), gan), max_steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before, gan.discriminator.parameters()))


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = torch.randn(5, 3)
    y = layer(x)
    nll = (y**2).mean()
    g = y.sum() * 3
    w = adaptive_weight(nll, g, layer.weight)
    gn = torch.autograd.grad((layer(x) ** 2).mean(), layer.weight)[0].norm()
    gg = torch.autograd.grad(layer(x).sum() * 3, layer.weight)[0].norm()
    assert w.item() == pytest.approx((gn / (gg + 1e-4)).item(), rel=1e-5)
    assert not w.requires_grad


def test_adaptive_weight_is_clamped():
    p = torch.ones(2, requires_grad=True)
    assert adaptive_weight((p * 1e6).sum(), (p * 1e-6).sum(), p, max_weight=10.0).item() == 10.0


def test_ema_follows_the_weights_and_is_used_for_validation():
    module = TokenizerModule(tiny_vqgan(), ReconstructionLoss(perceptual_weight=0), None, ema_decay=0.5)
    w0 = module.ema.module.decoder.conv_out.weight.clone()
    fit(module, max_steps=4)
    ema_w = module.ema.module.decoder.conv_out.weight
    assert not torch.equal(ema_w, w0)
    assert not torch.equal(ema_w, module.tokenizer.decoder.conv_out.weight)
    assert module.eval_tokenizer is module.ema.module


class NaNOnce(nn.Module):
    """A loss that is NaN at one chosen call."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad_calls, self.calls = set(bad_calls), 0

    def forward(self, recon, target):
        self.calls += 1
        v = ((recon - target) ** 2).mean()
        return {"pixel": v * float("nan") if self.calls in self.bad_calls else v}

    def total(self, recon, target):
        return sum(self(recon, target).values())


def test_non_finite_loss_skips_the_step_and_leaves_weights_finite():
    module = TokenizerModule(tiny_vqgan(), NaNOnce({2}), None)
    trainer = fit(module, max_steps=4)
    assert trainer.global_step == 4
    assert int(module.nonfinite_skipped) == 1
    assert all(torch.isfinite(p).all() for p in module.tokenizer.parameters())


def test_repeated_non_finite_losses_stop_with_a_clear_error():
    module = TokenizerModule(tiny_vqgan(), NaNOnce(set(range(1, 100))), None, max_consecutive_nonfinite=3)
    with pytest.raises(Exception, match="consecutive non-finite"):
        fit(module, max_steps=10)
