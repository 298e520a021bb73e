"""Generic reconstruction losses shared by every tokenizer (config group ``loss``)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers.perceptual import LPIPS


class ReconstructionLoss(nn.Module):
    """Pixel (L1 or MSE, averaged over pixels) plus perceptual (LPIPS) distance.

    Returns weighted terms; their sum is the ``nll`` the adaptive weights are measured
    against. Averaging (not summing) over pixels keeps weights comparable across
    resolutions; LDM-style configs that sum over pixels scale the other terms instead.
    """

    def __init__(self, pixel: str = "mse", pixel_weight: float = 1.0, perceptual_weight: float = 1.0,
                 perceptual: LPIPS | None = None):
        super().__init__()
        if pixel not in ("l1", "mse"):
            raise ValueError(f"loss.pixel must be 'l1' or 'mse', got {pixel!r}")
        self.pixel = pixel
        self.pixel_weight = pixel_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual = perceptual if perceptual_weight > 0 else None

    def forward(self, recon: Tensor, target: Tensor) -> dict[str, Tensor]:
        recon = recon.float()
        target = target.float()
        dist = F.l1_loss if self.pixel == "l1" else F.mse_loss
        terms = {"pixel": self.pixel_weight * dist(recon, target)}
        if self.perceptual is not None and self.perceptual.enabled:
            terms["perceptual"] = self.perceptual_weight * self.perceptual(recon, target).mean()
        return terms

    def total(self, recon: Tensor, target: Tensor) -> Tensor:
        return sum(self(recon, target).values())
