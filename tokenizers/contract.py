"""The contract every tokenizer meets (DESIGN.md, "The contract every tokenizer meets").

The training loop (`training.module.TokenizerModule`) and the evaluator only talk to
tokenizers through this file, so adding a family means one model file plus one config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class AdaptiveTerm:
    """A loss whose weight is set by a gradient-norm ratio (taming's adaptive GAN weight,
    VA-VAE's adaptive VF weight).

    The loop computes ``w = ||grad(nll, param)|| / (||grad(loss, param)|| + 1e-4)``,
    clamps it to ``[0, max_weight]``, detaches it and adds ``w * weight * loss``, where
    ``nll`` is the generic reconstruction + perceptual loss. Without a reconstruction
    (or when the loop cannot take gradients) it falls back to ``weight * loss``.
    """

    loss: Tensor
    param: Tensor
    weight: float = 1.0
    max_weight: float = 1e4
    #: the reduction over pixels of the reconstruction loss ``max_weight`` was published
    #: for: ``"mean"`` (this project's loss) or ``"sum"`` (LDM / taming / VA-VAE sum over
    #: the C*H*W elements of each image; see ``max_weight_for``)
    max_weight_reduction: str = "mean"

    def __post_init__(self) -> None:
        check_reduction(self.max_weight_reduction, "max_weight_reduction")

    def max_weight_for(self, images: Tensor) -> float:
        """The clamp in this project's (pixel-mean) units for a batch of target ``images``.

        A reference that sums its reconstruction loss over the ``N = C*H*W`` elements of
        each image measures a gradient-norm ratio ``N`` times this project's, clamps that,
        and adds ``w_sum * loss`` to an objective ``N`` times this project's. Divided by
        ``N``, its effective weight is ``min(ratio_mean, max_weight / N)``: the same
        formula with the clamp divided by ``N`` (exact, the ``1e-4`` sits on the other
        gradient). ``N`` is read from the step's images, so a step at another resolution
        (EQ-VAE's low-resolution branch) gets the reference's clamp too."""
        if self.max_weight_reduction == "sum":
            return self.max_weight / images[0].numel()
        return self.max_weight


def check_reduction(value: str, key: str) -> str:
    if value not in ("mean", "sum"):
        raise ValueError(
            f"{key} must be 'mean' (the clamp is for a pixel-averaged loss, as this project's) or 'sum' "
            f"(published for a pixel-summed loss, as LDM / VA-VAE), got {value!r}."
        )
    return value


@dataclass
class TokenizerOutput:
    """What ``forward`` returns during training."""

    reconstruction: Tensor | None  # images in [-1, 1], or None (e.g. FlexTok's flow decoder)
    losses: dict[str, Tensor] = field(default_factory=dict)  # already weighted, summed by the loop
    logs: dict[str, Tensor | float] = field(default_factory=dict)  # scalars to log (usage, perplexity...)
    latents: Any = None  # what decode_latents accepts (spatial latent map for conv tokenizers)
    adaptive: dict[str, AdaptiveTerm] = field(default_factory=dict)  # weighted by the loop


class Tokenizer(nn.Module):
    """Base class: the methods and facts the loop and the evaluator rely on.

    Subclasses implement ``encode``, ``decode``, ``forward``, ``encode_latents``,
    ``decode_latents``, set ``discrete`` / ``codebook_sizes`` and implement
    ``token_shape``.
    """

    #: True for integer codes, False for continuous latents.
    discrete: bool = True
    #: vocabulary size of each codebook (empty for continuous tokenizers)
    codebook_sizes: tuple[int, ...] = ()
    #: False when ``forward`` returns no reconstruction (FlexTok's flow decoder): the loop
    #: then builds no pixel/perceptual loss and no discriminator for it.
    reconstructs_in_training: bool = True

    # -- the contract --------------------------------------------------------------
    def encode(self, images: Tensor) -> Any:
        """Images in [-1, 1] -> tokens (index map(s) for discrete, latents for continuous)."""
        raise NotImplementedError

    def decode(self, tokens: Any, **options) -> Tensor:
        """Tokens from ``encode`` -> images in [-1, 1]."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> TokenizerOutput:
        raise NotImplementedError

    def forward_transformed(self, images: Tensor, latent_transform) -> TokenizerOutput:
        """``forward`` whose decoder reads ``latent_transform(latents)`` (EQ-VAE's step on a
        transformed pair); the returned ``latents`` are the transformed ones. This default
        decodes twice (the plain reconstruction is discarded); families override it to
        decode once."""
        out = self(images)
        z = latent_transform(out.latents)
        return replace(out, reconstruction=self.decode_latents(z), latents=z)

    def encode_latents(self, images: Tensor) -> Tensor:
        """Images -> the continuous spatial latent the decoder reads (quantized for VQ).

        Used by latent-space regularisers and by the latent generator (gFID)."""
        raise NotImplementedError

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Inverse of ``encode_latents``: latent map -> images in [-1, 1]."""
        raise NotImplementedError

    def decoder_last_layer(self) -> Tensor:
        """Weight of the decoder's last layer (adaptive GAN weight)."""
        raise NotImplementedError

    def encoder_last_layer(self) -> Tensor:
        """Weight of the encoder's last layer (adaptive VF weight)."""
        raise NotImplementedError

    # -- facts for the report --------------------------------------------------------
    def token_shape(self, image_size: int) -> tuple[int, ...]:
        """Shape of one codebook's token grid (or the latent grid) for square images."""
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        """(C, H, W) of ``encode_latents`` for square images."""
        raise NotImplementedError

    def tokens_per_image(self, image_size: int) -> int:
        n = math.prod(self.token_shape(image_size))
        return n * max(1, len(self.codebook_sizes))

    def bits_per_image(self, image_size: int) -> float | None:
        """Bits needed to store one image's tokens; None for continuous latents."""
        if not self.discrete:
            return None
        n = math.prod(self.token_shape(image_size))
        return float(sum(n * math.log2(k) for k in self.codebook_sizes))

    def set_teachers_device(self, device: torch.device) -> None:  # pragma: no cover - optional
        """Hook for families holding frozen teachers outside their parameters."""
