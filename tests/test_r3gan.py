"""R3GAN: relativistic pairing, R1/R2 gradient penalties, gamma schedule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.gan import AdversarialLoss, NLayerDiscriminator
from tokenizers.r3gan import R3GANLoss, gradient_penalty


class LinearDiscriminator(nn.Module):
    """D(x) = <w, x> + b per sample: grad_x D = w, so R1 = ||w||^2 for every input."""

    def __init__(self, shape=(3, 4, 4)):
        super().__init__()
        self.w = nn.Parameter(torch.randn(*shape))
        self.b = nn.Parameter(torch.randn(()))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1, keepdim=True) + self.b


def test_r1_equals_the_analytic_squared_gradient_norm_of_a_linear_discriminator():
    torch.manual_seed(0)
    d = LinearDiscriminator()
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    _, penalty = gradient_penalty(d, x)
    assert penalty.shape == (5,)
    assert torch.allclose(penalty, d.w.pow(2).sum().expand(5), rtol=1e-5)


def test_discriminator_loss_is_relativistic_softplus_plus_half_gamma_r1_r2():
    torch.manual_seed(1)
    d = LinearDiscriminator()
    gan = R3GANLoss(d, gamma=0.3, gamma_schedule="constant")
    real, fake = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    loss, logs = gan.discriminator_loss(real, fake)
    with torch.no_grad():
        diff = d(real) - d(fake)
        w2 = d.w.pow(2).sum()
    expected = F.softplus(-diff).mean() + 0.5 * 0.3 * (w2 + w2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["r1"].item() == pytest.approx(w2.item(), rel=1e-5)
    assert logs["r2"].item() == pytest.approx(w2.item(), rel=1e-5)


def test_generator_loss_is_relativistic_softplus_and_reaches_only_the_fake():
    torch.manual_seed(2)
    d = LinearDiscriminator()
    gan = R3GANLoss(d)
    real = torch.randn(4, 3, 4, 4, requires_grad=True)
    fake = torch.randn(4, 3, 4, 4, requires_grad=True)
    g = gan.generator_loss(fake, real)
    with torch.no_grad():
        expected = F.softplus(-(d(fake) - d(real))).mean()
    assert g.item() == pytest.approx(expected.item(), rel=1e-5)
    g.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert real.grad is None


def test_penalty_trains_the_discriminator_weights():
    torch.manual_seed(3)
    d = LinearDiscriminator()
    gan = R3GANLoss(d, gamma=1.0)
    real, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    loss, _ = gan.discriminator_loss(real, fake)
    loss.backward()
    # d/dw of the softplus part plus gamma/2 * (2 * 2 w) from R1 + R2
    with torch.no_grad():
        s = torch.sigmoid(-(d(real) - d(fake))).view(2, 1, 1, 1)
        expected = (-(s * (real - fake))).mean(0) + 2 * d.w
    assert torch.allclose(d.w.grad, expected, atol=1e-5)


def test_gamma_anneals_from_gamma_to_a_tenth_over_the_schedule_after_disc_start():
    cosine = R3GANLoss(LinearDiscriminator(), disc_start=100, gamma=2.0, gamma_steps=1000, gamma_schedule="cosine")
    linear = R3GANLoss(LinearDiscriminator(), disc_start=100, gamma=2.0, gamma_steps=1000, gamma_schedule="linear")
    for sched in (cosine, linear):
        assert sched.gamma_at(None) == 2.0
        assert sched.gamma_at(0) == 2.0
        assert sched.gamma_at(100) == 2.0
        assert sched.gamma_at(600) == pytest.approx(1.1)  # half-way: the mean of 2.0 and 0.2
        assert sched.gamma_at(1100) == pytest.approx(0.2)
        assert sched.gamma_at(10**6) == pytest.approx(0.2)
    assert linear.gamma_at(350) == pytest.approx(2.0 - 1.8 * 0.25)
    assert cosine.gamma_at(350) > linear.gamma_at(350)  # cosine decays slowly at first


def test_discriminator_loss_uses_the_scheduled_gamma_of_the_step():
    torch.manual_seed(4)
    d = LinearDiscriminator()
    gan = R3GANLoss(d, gamma=1.0, gamma_end=0.0, gamma_steps=10, gamma_schedule="linear")
    real, fake = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    _, logs_start = gan.discriminator_loss(real, fake, step=0)
    loss_end, logs_end = gan.discriminator_loss(real, fake, step=10)
    assert logs_start["gamma"].item() == 1.0 and logs_end["gamma"].item() == 0.0
    assert loss_end.item() == pytest.approx(logs_end["adversarial"].item())


def test_r3gan_meets_the_adversarial_interface_with_a_patchgan():
    gan = R3GANLoss(NLayerDiscriminator(ndf=8, n_layers=2), disc_start=5, weighting="adaptive", gamma=0.1)
    assert isinstance(gan, AdversarialLoss)
    assert not gan.active(4) and gan.active(5)
    assert (gan.weighting, gan.disc_weight, gan.max_adaptive_weight) == ("adaptive", 0.5, 1e4)
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    loss, logs = gan.discriminator_loss(real, fake, step=7)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in gan.discriminator.parameters())
    assert {"r1", "r2", "gamma", "adversarial", "logits_real", "logits_fake"} <= set(logs)


def test_unknown_gamma_schedule_is_rejected():
    with pytest.raises(ValueError, match="gamma_schedule"):
        R3GANLoss(LinearDiscriminator(), gamma_schedule="exponential")
