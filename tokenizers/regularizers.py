"""Latent-space regularisers for diffusability (SPEC.md §4), for any tokenizer.

A regulariser only uses the tokenizer contract: ``output.latents`` (the spatial latent the
decoder read in this step), ``tokenizer.decode_latents`` and the loop's
``reconstruction_loss(recon, target) -> Tensor``. VQGAN, FQGAN and the VAEs therefore get
the same code path; tokenizers whose latents are not a (B, C, H, W) map (FlexTok) are
rejected with a clear error.

The transforms (``rotate90``, ``scale``) are plain functions applied identically to
latents and images, so the claim "decode(T z) should equal T x" is testable in isolation.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers.contract import Tokenizer, TokenizerOutput

ReconstructionLoss = Callable[[Tensor, Tensor], Tensor]


# -- transforms shared by latents and images -----------------------------------------------
def rotate90(x: Tensor, k: int) -> Tensor:
    """Rotate (..., H, W) maps by ``k`` quarter turns counter-clockwise in the H-W plane."""
    return torch.rot90(x, k % 4, dims=(-2, -1))


def scale(x: Tensor, size: Sequence[int] | int, antialias: bool = True) -> Tensor:
    """Bilinear resize of (B, C, H, W) maps to ``size`` (h, w).

    With ``antialias`` the kernel widens when shrinking (a low-pass before subsampling), so a
    factor-4 downsample does not alias; enlarging is plain bilinear either way."""
    if isinstance(size, int):
        size = (size, size)
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    out = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return out.to(x.dtype)


def _spatial_latents(output: TokenizerOutput, name: str) -> Tensor:
    z = output.latents
    if not isinstance(z, Tensor) or z.dim() != 4:
        got = type(z).__name__ if not isinstance(z, Tensor) else f"a {z.dim()}-d tensor"
        raise TypeError(
            f"regularizer {name} needs output.latents to be a spatial latent map (B, C, H, W), got {got}. "
            "Fix: use regularizer=none for this tokenizer (latent-space regularisers apply to conv tokenizers)."
        )
    return z


class Regularizer(nn.Module):
    """Base class: ``regularizer(tokenizer, images, output, reconstruction_loss) -> dict``
    of already-weighted losses added to the tokenizer's objective."""

    def forward(
        self,
        tokenizer: Tokenizer,
        images: Tensor,
        output: TokenizerOutput,
        reconstruction_loss: ReconstructionLoss,
    ) -> dict[str, Tensor]:
        raise NotImplementedError


class ScaleEquivariance(Regularizer):
    """Scale equivariance (Skorokhodov et al. 2025): ``d(down(x), Dec(down(z)))``.

    The latent of this step is bilinearly downsampled by a factor drawn uniformly from
    ``factors`` (2 or 4, or a list to choose from each step), decoded, and compared with
    the image downsampled to the decoded size by the loop's reconstruction loss. Meant for
    a short fine-tune (10-20k steps); the weight and factors are unpublished, hence config.
    """

    def __init__(self, weight: float = 1.0, factors: Sequence[int] | int = (2, 4), antialias: bool = True):
        super().__init__()
        factors = (factors,) if isinstance(factors, int) else tuple(int(f) for f in factors)
        if not factors or any(f < 2 for f in factors):
            raise ValueError(f"scale-equivariance factors must be integers >= 2, got {factors}.")
        self.weight = weight
        self.factors = factors
        self.antialias = antialias

    def sample_factor(self) -> int:
        return random.choice(self.factors)

    def forward(self, tokenizer, images, output, reconstruction_loss):
        z = _spatial_latents(output, "scale_equivariance")
        factor = self.sample_factor()
        h, w = z.shape[-2:]
        if h < factor or w < factor:
            raise ValueError(
                f"latent grid {h}x{w} is smaller than the downsampling factor {factor}. "
                f"Fix: use larger images or regularizer.factors=[2] (factors now {list(self.factors)})."
            )
        z_small = scale(z, (h // factor, w // factor), self.antialias)
        recon = tokenizer.decode_latents(z_small)
        target = scale(images, recon.shape[-2:], self.antialias)
        return {"scale_equivariance": self.weight * reconstruction_loss(recon, target)}


@dataclass(frozen=True)
class LatentTransform:
    """One EQ-VAE transform: scale by ``scale_factor`` (None: none), then rotate ``k`` quarter turns."""

    scale_factor: float | None = None
    k: int = 0

    def latent_size(self, h: int, w: int) -> tuple[int, int]:
        if self.scale_factor is None:
            return h, w
        return max(1, round(h * self.scale_factor)), max(1, round(w * self.scale_factor))

    def apply(self, x: Tensor, size: Sequence[int] | None = None, antialias: bool = True) -> Tensor:
        """Apply to latents or images. ``size``: the (h, w) to scale to (before rotation);
        default ``latent_size`` of ``x``. Images are scaled to the decoded size of the
        transformed latent so that target and reconstruction align pixel for pixel."""
        if self.scale_factor is not None:
            x = scale(x, size if size is not None else self.latent_size(*x.shape[-2:]), antialias)
        return rotate90(x, self.k) if self.k else x


class EQVAE(Regularizer):
    """EQ-VAE (Kouzelis et al. 2025): equivariance of the decoder to latent transforms.

    With probability ``probability`` per step, a transform T is drawn (one of ``modes``:
    ``scale`` with s ~ U[scale_range], ``rotate`` by k in ``rotations``, or
    ``scale_rotate`` both) and ``weight * d(Dec(T z), T x)`` is added, ``d`` the loop's
    reconstruction loss. The reference replaces the whole step's loss by the transformed
    one; through this interface the untransformed loss stays and this term is added
    (so the expected objective weights the transformed targets by ``probability * weight``).
    Returns an empty dict on steps without a transform.
    """

    def __init__(
        self,
        weight: float = 1.0,
        probability: float = 0.5,
        scale_range: Sequence[float] = (0.25, 0.97),
        rotations: Sequence[int] = (1, 2, 3),
        modes: Sequence[str] = ("scale", "rotate", "scale_rotate"),
        antialias: bool = True,
    ):
        super().__init__()
        bad = set(modes) - {"scale", "rotate", "scale_rotate"}
        if bad or not modes:
            raise ValueError(f"EQ-VAE modes must be among scale, rotate, scale_rotate; got {list(modes)}.")
        if not 0.0 < scale_range[0] <= scale_range[1] <= 1.0:
            raise ValueError(f"EQ-VAE scale_range must satisfy 0 < low <= high <= 1, got {list(scale_range)}.")
        self.weight = weight
        self.probability = probability
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.rotations = tuple(int(k) for k in rotations)
        self.modes = tuple(modes)
        self.antialias = antialias

    def sample_transform(self) -> LatentTransform:
        mode = random.choice(self.modes)
        s = random.uniform(*self.scale_range) if "scale" in mode else None
        k = random.choice(self.rotations) if "rotate" in mode else 0
        return LatentTransform(scale_factor=s, k=k)

    def transformed_loss(self, tokenizer, images, latents, reconstruction_loss, transform: LatentTransform):
        """``d(Dec(T z), T x)`` for a given transform (the image goes to the decoded size)."""
        z_t = transform.apply(latents, antialias=self.antialias)
        recon = tokenizer.decode_latents(z_t)
        # the decoded size before rotation: rot90 by an odd k swaps H and W
        size = recon.shape[-2:] if transform.k % 2 == 0 else recon.shape[-2:][::-1]
        target = transform.apply(images, size=size if transform.scale_factor is not None else None, antialias=self.antialias)
        return reconstruction_loss(recon, target)

    def forward(self, tokenizer, images, output, reconstruction_loss):
        z = _spatial_latents(output, "eq_vae")
        if random.random() >= self.probability:
            return {}
        loss = self.transformed_loss(tokenizer, images, z, reconstruction_loss, self.sample_transform())
        return {"eq_vae": self.weight * loss}
