"""R3GAN adversarial loss (SPEC.md §7): relativistic pairing + R1 + R2.

    L_D = E softplus(-(D(real) - D(fake))) + gamma / 2 * (R1 + R2)
    L_G = E softplus(-(D(fake) - D(real)))

Pairing: the i-th real image is paired with the i-th fake, which for a tokenizer is its
own reconstruction. With a PatchGAN the logits are a map and the pairing is per patch
(the same patch of the original and of its reconstruction).

R1 / R2: the squared norm of the gradient of D at the real / fake inputs, per sample,
summed over C, H, W, then averaged over the batch. For a patch map, D's per-sample
output is taken as the sum of its patch logits (one backward pass; for a scalar-output
discriminator this is exactly the usual R1).

gamma: data-dependent (0.05 CIFAR .. 150 FFHQ-256) and usually annealed 10x. Here
``gamma`` decays to ``gamma_end`` (default ``gamma / 10``) over ``gamma_steps`` steps
counted from ``disc_start`` (the discriminator does not train before), with
``gamma_schedule`` constant | linear | cosine.

``discriminator_loss(real, fake, step=None)``: the loop passes ``step=`` (its global
step, batches seen) so the schedule can be evaluated; ``step=None`` means the start of
the schedule (``gamma``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers.gan import AdversarialLoss, NLayerDiscriminator


def gradient_penalty(discriminator: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, per-sample ``||grad_x sum D(x)||^2`` summed over C, H, W: shape (B,)).

    ``x`` must be a leaf that requires grad; the graph is kept (``create_graph``) so the
    penalty trains the discriminator."""
    logits = discriminator(x).float()
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return logits, grad.float().pow(2).flatten(1).sum(1)


class R3GANLoss(AdversarialLoss):
    """Relativistic pairing GAN loss with R1 + R2 (Huang et al. 2024, "The GAN is dead;
    long live the GAN!"). Same interface as ``tokenizers.gan.PatchGANHinge``.

    Args (beyond ``AdversarialLoss``'s):
        gamma: R1/R2 weight at the start of the schedule.
        gamma_end: weight at the end of the schedule (default ``gamma / 10``).
        gamma_steps: length of the schedule in steps after ``disc_start`` (0: constant).
        gamma_schedule: ``constant``, ``linear`` or ``cosine``.
    """

    def __init__(
        self,
        discriminator: nn.Module | None = None,
        disc_start: int = 0,
        weighting: str = "constant",
        disc_weight: float = 0.5,
        max_adaptive_weight: float = 1e4,
        max_adaptive_weight_reduction: str = "mean",
        gamma: float = 1.0,
        gamma_end: float | None = None,
        gamma_steps: int = 0,
        gamma_schedule: str = "cosine",
    ):
        if gamma_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"gan.gamma_schedule must be constant, linear or cosine, got {gamma_schedule!r}.")
        if gamma < 0 or (gamma_end is not None and gamma_end < 0):
            raise ValueError(f"gan.gamma and gan.gamma_end must be >= 0, got {gamma} and {gamma_end}.")
        super().__init__(
            discriminator if discriminator is not None else NLayerDiscriminator(),
            disc_start=disc_start,
            weighting=weighting,
            disc_weight=disc_weight,
            max_adaptive_weight=max_adaptive_weight,
            max_adaptive_weight_reduction=max_adaptive_weight_reduction,
        )
        self.gamma = float(gamma)
        self.gamma_end = float(gamma / 10.0 if gamma_end is None else gamma_end)
        self.gamma_steps = int(gamma_steps)
        self.gamma_schedule = gamma_schedule

    def gamma_at(self, step: int | None) -> float:
        """gamma of the schedule at a global step (``None``: the start value)."""
        if step is None or self.gamma_schedule == "constant" or self.gamma_steps <= 0:
            return self.gamma
        t = min(max((step - self.disc_start) / self.gamma_steps, 0.0), 1.0)
        if self.gamma_schedule == "linear":
            blend = t
        else:  # cosine: slow start, slow end
            blend = 0.5 * (1.0 - math.cos(math.pi * t))
        return self.gamma + (self.gamma_end - self.gamma) * blend

    def generator_loss(self, fake: Tensor, real: Tensor) -> Tensor:
        logits_fake = self.discriminator(fake).float()
        # real images carry no gradient to the tokenizer; their logits only set the reference
        with torch.no_grad():
            logits_real = self.discriminator(real.detach()).float()
        return F.softplus(-(logits_fake - logits_real)).mean()

    def discriminator_loss(self, real: Tensor, fake: Tensor, step: int | None = None) -> tuple[Tensor, dict]:
        real = real.detach().requires_grad_(True)
        fake = fake.detach().requires_grad_(True)
        gamma = self.gamma_at(step)
        if gamma > 0:
            logits_real, r1 = gradient_penalty(self.discriminator, real)
            logits_fake, r2 = gradient_penalty(self.discriminator, fake)
            r1, r2 = r1.mean(), r2.mean()
        else:  # no penalty: skip the double backward
            logits_real = self.discriminator(real).float()
            logits_fake = self.discriminator(fake).float()
            r1 = r2 = logits_real.new_zeros(())
        adversarial = F.softplus(-(logits_real - logits_fake)).mean()
        loss = adversarial + 0.5 * gamma * (r1 + r2)
        logs = {
            "adversarial": adversarial.detach(),
            "r1": r1.detach(),
            "r2": r2.detach(),
            "gamma": logits_real.new_tensor(gamma),
            "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach(),
        }
        return loss, logs
