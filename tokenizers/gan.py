"""Adversarial losses (config group ``gan``): the interface, PatchGAN + hinge.

``AdversarialLoss`` is what the loop talks to; R3GAN (``tokenizers/r3gan.py``) meets the
same interface.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers.contract import check_reduction


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): 4x4 convs, BatchNorm, LeakyReLU 0.2, N(0, 0.02) init."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        Norm = {"batch": nn.BatchNorm2d, "group": lambda c: nn.GroupNorm(1, c), "none": lambda c: nn.Identity()}[norm]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), Norm(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AdversarialLoss(nn.Module):
    """Interface the loop uses.

    ``weighting``: ``constant`` (generator term times ``disc_weight``, LlamaGen) or
    ``adaptive`` (taming: ``||grad nll|| / (||grad g|| + 1e-4)`` on the decoder's last
    layer, clamped to ``max_adaptive_weight``, times ``disc_weight``). Both generator and
    discriminator terms are off before ``disc_start``. ``max_adaptive_weight_reduction``
    ``sum`` reads ``max_adaptive_weight`` as published for a pixel-summed loss (taming /
    LDM / VA-VAE: 1e4) and applies the equivalent clamp to this project's averaged loss
    (``AdaptiveTerm.max_weight_for``).

    ``weight_disc_loss``: multiply the discriminator's own loss by ``disc_weight`` too, as
    LlamaGen's and FQGAN's ``VQLoss`` do (``disc_weight * hinge_d_loss``). Adam barely sees
    a constant factor, but the discriminator's gradient clipping does (the clip norm acts
    on the scaled gradient). False: the unweighted loss (taming).
    """

    def __init__(self, discriminator: nn.Module, disc_start: int = 0, weighting: str = "constant",
                 disc_weight: float = 0.5, max_adaptive_weight: float = 1e4, weight_disc_loss: bool = False,
                 max_adaptive_weight_reduction: str = "mean"):
        super().__init__()
        if weighting not in ("constant", "adaptive"):
            raise ValueError(f"gan.weighting must be 'constant' or 'adaptive', got {weighting!r}")
        self.max_adaptive_weight_reduction = check_reduction(max_adaptive_weight_reduction,
                                                             "gan.max_adaptive_weight_reduction")
        self.discriminator = discriminator
        self.disc_start = disc_start
        self.weighting = weighting
        self.disc_weight = disc_weight
        self.max_adaptive_weight = max_adaptive_weight
        self.disc_loss_weight = float(disc_weight) if weight_disc_loss else 1.0

    def active(self, step: int) -> bool:
        return step >= self.disc_start

    def generator_loss(self, fake: Tensor, real: Tensor) -> Tensor:
        raise NotImplementedError

    def discriminator_loss(self, real: Tensor, fake: Tensor, step: int | None = None) -> tuple[Tensor, dict]:
        raise NotImplementedError


class PatchGANHinge(AdversarialLoss):
    def generator_loss(self, fake: Tensor, real: Tensor) -> Tensor:
        return -self.discriminator(fake).float().mean()

    def discriminator_loss(self, real: Tensor, fake: Tensor, step: int | None = None) -> tuple[Tensor, dict]:
        logits_real = self.discriminator(real.detach()).float()
        logits_fake = self.discriminator(fake.detach()).float()
        loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        return self.disc_loss_weight * loss, {"logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}
