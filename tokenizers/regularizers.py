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

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers.contract import Tokenizer, TokenizerOutput

log = logging.getLogger(__name__)

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

    def __init__(
        self,
        weight: float = 1.0,
        factors: Sequence[int] | int = (2, 4),
        antialias: bool = True,
        min_image_size: int = 16,
    ):
        super().__init__()
        factors = (factors,) if isinstance(factors, int) else tuple(int(f) for f in factors)
        if not factors or any(f < 2 for f in factors):
            raise ValueError(f"scale-equivariance factors must be integers >= 2, got {factors}.")
        self.weight = weight
        self.factors = factors
        self.antialias = antialias
        # LPIPS-VGG needs >= 16 px (four 2x max-pools): smaller targets break the perceptual loss
        self.min_image_size = min_image_size
        self._warned: set[tuple[int, int]] = set()

    def usable_factors(self, latent_hw: Sequence[int], image_hw: Sequence[int]) -> tuple[int, ...]:
        """Factors that leave at least a 1x1 latent and ``min_image_size`` pixels."""
        usable = tuple(
            f for f in self.factors
            if min(latent_hw) >= f and min(image_hw) // f >= self.min_image_size
        )
        if not usable:
            raise ValueError(
                f"no scale-equivariance factor in {list(self.factors)} fits a {latent_hw[0]}x{latent_hw[1]} latent "
                f"and {image_hw[0]}x{image_hw[1]} images (each needs a latent of >= 1 token and images of >= "
                f"{self.min_image_size} px after downsampling). Fix: use larger images, regularizer.factors=[2], "
                "or lower regularizer.min_image_size (only with a pixel-only loss)."
            )
        key = (min(latent_hw), min(image_hw))
        if len(usable) < len(self.factors) and key not in self._warned:
            self._warned.add(key)
            log.warning("scale_equivariance: factors %s skipped at %s px images (min_image_size %d).",
                        sorted(set(self.factors) - set(usable)), image_hw[0], self.min_image_size)
        return usable

    def sample_factor(self, usable: Sequence[int] | None = None) -> int:
        return random.choice(tuple(usable) if usable else self.factors)

    def forward(self, tokenizer, images, output, reconstruction_loss):
        z = _spatial_latents(output, "scale_equivariance")
        h, w = z.shape[-2:]
        factor = self.sample_factor(self.usable_factors((h, w), images.shape[-2:]))
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
        min_image_size: int = 16,
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
        # LPIPS-VGG needs >= 16 px: small scales are raised so the decoded image keeps this size
        self.min_image_size = min_image_size

    def sample_transform(self, latent_hw: Sequence[int] | None = None, image_hw: Sequence[int] | None = None) -> LatentTransform:
        """Draw a transform; with the latent and image sizes, a scale is raised where needed
        so that the decoded image keeps ``min_image_size`` pixels (dropped if even s = 1
        cannot)."""
        mode = random.choice(self.modes)
        s = random.uniform(*self.scale_range) if "scale" in mode else None
        k = random.choice(self.rotations) if "rotate" in mode else 0
        if s is not None and latent_hw is not None and image_hw is not None:
            h = min(latent_hw)
            pixels_per_token = min(image_hw) / h
            min_tokens = math.ceil(self.min_image_size / pixels_per_token)
            s = max(s, min_tokens / h)
            if s > 1.0:
                s = None
        if s is None and k == 0:
            k = random.choice(self.rotations) if self.rotations else 0
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
        transform = self.sample_transform(z.shape[-2:], images.shape[-2:])
        if transform.scale_factor is None and transform.k == 0:
            return {}
        loss = self.transformed_loss(tokenizer, images, z, reconstruction_loss, transform)
        return {"eq_vae": self.weight * loss}
