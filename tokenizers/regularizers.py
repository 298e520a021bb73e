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
    return _check_spatial(output.latents, name)


def _check_spatial(z, name: str) -> Tensor:
    if not isinstance(z, Tensor) or z.dim() != 4:
        got = type(z).__name__ if not isinstance(z, Tensor) else f"a {z.dim()}-d tensor"
        raise TypeError(
            f"regularizer {name} needs output.latents to be a spatial latent map (B, C, H, W), got {got}. "
            "Fix: use regularizer=none for this tokenizer (latent-space regularisers apply to conv tokenizers)."
        )
    return z


class Regularizer(nn.Module):
    """Base class: ``regularizer(tokenizer, images, output, reconstruction_loss) -> dict``
    of already-weighted losses added to the tokenizer's objective.

    ``training_pair(tokenizer, images)`` lets a regulariser replace the step itself: it
    returns ``(target_images, output)`` for the loop to train on (every loss of the step,
    the discriminator's included, then compares ``output.reconstruction`` with
    ``target_images``), or None for the plain step ``(images, tokenizer(images))``.
    """

    def training_pair(self, tokenizer: Tokenizer, images: Tensor) -> tuple[Tensor, TokenizerOutput] | None:
        return None

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
        # floor, as F.interpolate(scale_factor=s) in the paper (s < 1 always shrinks)
        return (max(1, math.floor(h * self.scale_factor + 1e-6)), max(1, math.floor(w * self.scale_factor + 1e-6)))

    def apply(self, x: Tensor, size: Sequence[int] | None = None, antialias: bool = True) -> Tensor:
        """Apply to latents or images. ``size``: the (h, w) to scale to (before rotation);
        default ``latent_size`` of ``x``. Images are scaled to the decoded size of the
        transformed latent so that target and reconstruction align pixel for pixel."""
        if self.scale_factor is not None:
            x = scale(x, size if size is not None else self.latent_size(*x.shape[-2:]), antialias)
        return rotate90(x, self.k) if self.k else x


class EQVAE(Regularizer):
    """EQ-VAE (Kouzelis et al. 2025): equivariance of the decoder to latent transforms.

    ``variant="paper"`` follows the paper's code (github.com/zelaki/eqvae,
    ``train_eqvae/ldm/models/autoencoder.py``), through ``training_pair``: per step,

    - with probability ``probability`` (its ``p_prior`` 0.5) the whole step runs on the
      transformed pair: the latent z of the step is scaled (s drawn from ``scale_range``
      on a grid of ``scale_step``: {8/32, ..., 31/32}) and rotated (k in ``rotations``)
      together, decoded, and every loss of the step (reconstruction, perceptual, GAN, the
      discriminator's) compares ``Dec(T z)`` with the identically transformed image ``T x``;
    - otherwise, with probability ``low_res_probability`` (its ``p_prior_s`` 0.25), prior
      preservation at low resolution: the image is downscaled by such an s and the plain
      step runs on it;
    - otherwise the plain step.

    The image is resized to the decoded size (the paper resizes by the same factor, which
    is the decoded size when the latent side times s is an integer, as for its f8 VAEs at
    256 px); low-resolution images are rounded to a multiple of the tokenizer's
    downsampling factor. The paper rotates with ``dims=[-1, -2]`` (clockwise) and this
    code counter-clockwise: with k uniform over {1, 2, 3} the same set of transforms.
    Resizing is plain bilinear in the paper (``antialias: false``).

    ``variant="additive"`` keeps the untransformed step and adds ``weight * d(Dec(T z), T x)``
    with probability ``probability`` (one of ``modes`` per step: ``scale``, ``rotate`` or
    ``scale_rotate``), d the loop's reconstruction loss; no low-resolution branch.
    """

    def __init__(
        self,
        variant: str = "paper",
        weight: float = 1.0,
        probability: float = 0.5,
        low_res_probability: float = 0.25,
        scale_range: Sequence[float] = (0.25, 0.97),
        scale_step: float | None = 1.0 / 32,
        rotations: Sequence[int] = (1, 2, 3),
        modes: Sequence[str] = ("scale_rotate",),
        antialias: bool = False,
        min_image_size: int = 16,
    ):
        super().__init__()
        if variant not in ("paper", "additive"):
            raise ValueError(f"EQ-VAE variant must be 'paper' or 'additive', got {variant!r}.")
        bad = set(modes) - {"scale", "rotate", "scale_rotate"}
        if bad or not modes:
            raise ValueError(f"EQ-VAE modes must be among scale, rotate, scale_rotate; got {list(modes)}.")
        if not 0.0 < scale_range[0] <= scale_range[1] <= 1.0:
            raise ValueError(f"EQ-VAE scale_range must satisfy 0 < low <= high <= 1, got {list(scale_range)}.")
        if scale_step is not None and scale_step <= 0:
            raise ValueError(f"EQ-VAE scale_step must be > 0 or null (continuous scales), got {scale_step}.")
        self.variant = variant
        self.weight = weight
        self.probability = probability
        self.low_res_probability = low_res_probability
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.scale_step = None if scale_step is None else float(scale_step)
        self.rotations = tuple(int(k) for k in rotations)
        self.modes = tuple(modes)
        self.antialias = antialias
        # LPIPS-VGG needs >= 16 px: small scales are raised so the decoded image keeps this size
        self.min_image_size = min_image_size

    def sample_scale(self) -> float:
        low, high = self.scale_range
        if self.scale_step is None:
            return random.uniform(low, high)
        first, last = math.ceil(low / self.scale_step - 1e-9), math.floor(high / self.scale_step + 1e-9)
        return random.randint(first, last) * self.scale_step

    def sample_transform(self, latent_hw: Sequence[int] | None = None, image_hw: Sequence[int] | None = None) -> LatentTransform:
        """Draw a transform; with the latent and image sizes, a scale is raised where needed
        so that the decoded image keeps ``min_image_size`` pixels (dropped if even s = 1
        cannot)."""
        mode = random.choice(self.modes)
        s = self.sample_scale() if "scale" in mode else None
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

    def _target(self, images: Tensor, recon: Tensor, transform: LatentTransform) -> Tensor:
        # the decoded size before rotation: rot90 by an odd k swaps H and W
        size = recon.shape[-2:] if transform.k % 2 == 0 else recon.shape[-2:][::-1]
        return transform.apply(images, size=size if transform.scale_factor is not None else None,
                               antialias=self.antialias)

    def transformed_loss(self, tokenizer, images, latents, reconstruction_loss, transform: LatentTransform):
        """``d(Dec(T z), T x)`` for a given transform (the image goes to the decoded size)."""
        recon = tokenizer.decode_latents(transform.apply(latents, antialias=self.antialias))
        return reconstruction_loss(recon, self._target(images, recon, transform))

    # -- the paper's step ---------------------------------------------------------------------
    def transformed_pair(self, tokenizer: Tokenizer, images: Tensor,
                         transform: LatentTransform) -> tuple[Tensor, TokenizerOutput]:
        """``(T x, output with reconstruction Dec(T z))``: the step's forward, its decoder
        reading the transformed latent (its other losses, e.g. KL and VF, unchanged)."""
        out = tokenizer.forward_transformed(
            images, lambda z: transform.apply(_check_spatial(z, "eq_vae"), antialias=self.antialias))
        return self._target(images, out.reconstruction, transform), out

    def low_resolution_pair(self, tokenizer: Tokenizer, images: Tensor, s: float) -> tuple[Tensor, TokenizerOutput]:
        """The plain step on the image downscaled by ``s`` (side rounded to a multiple of the
        tokenizer's downsampling factor, at least ``min_image_size``)."""
        h, w = images.shape[-2:]
        factor = max(1, h // tokenizer.token_shape(h)[0])
        least = factor * math.ceil(self.min_image_size / factor)
        size = tuple(min(n, max(least, factor * round(n * s / factor))) for n in (h, w))
        small = scale(images, size, self.antialias)
        return small, tokenizer(small)

    def training_pair(self, tokenizer, images):
        if self.variant != "paper":
            return None
        if random.random() < self.probability:
            side = min(images.shape[-2:])
            tokens = tokenizer.token_shape(side)[0]
            transform = self.sample_transform((tokens, tokens), (side, side))
            return self.transformed_pair(tokenizer, images, transform)
        if random.random() < self.low_res_probability:
            return self.low_resolution_pair(tokenizer, images, self.sample_scale())
        return None

    def forward(self, tokenizer, images, output, reconstruction_loss):
        if self.variant == "paper":
            return {}  # the paper's objective is the step itself (training_pair)
        z = _spatial_latents(output, "eq_vae")
        if random.random() >= self.probability:
            return {}
        transform = self.sample_transform(z.shape[-2:], images.shape[-2:])
        if transform.scale_factor is None and transform.k == 0:
            return {}
        loss = self.transformed_loss(tokenizer, images, z, reconstruction_loss, transform)
        return {"eq_vae": self.weight * loss}
