"""Banded 2D DCT energy of latents and images: the spectral diagnosis of SPEC.md §4.

Latents with relatively more high-frequency energy than images are harder for a latent
diffusion model to fit. ``dct_band_energy`` gives one curve per set of maps (latents or
RGB images, any size, so the two are comparable) and a single number, the
high-frequency share.

Definitions
-----------
- Transform: orthonormal DCT-II along H and along W of every channel (matrix form,
  ``D_H X D_W^T``); orthonormal, so the energies of the coefficients sum to the energy of
  the map (Parseval) and the spectrum does not depend on the grid's size through scale.
- Energy, not amplitude: each coefficient contributes its square.
- Radial frequency of coefficient (k, l) on an H x W grid:
  ``r = sqrt((k / H)^2 + (l / W)^2) / sqrt(2)``, in [0, 1) for every grid size
  (k / H is the frequency in cycles per two samples, normalised to the grid).
- Bands: ``num_bands`` equal-width bins of r; band 0 holds the DC coefficient.
- Per (image, channel) the band energies are divided by that map's total energy (so a
  channel with a large scale does not dominate), then averaged over channels and images.
  All-zero maps carry no spectrum and are left out of the average.
- Optionally (``exclude_dc``) the DC coefficient is dropped first, so that a map's mean,
  which otherwise dominates band 0, does not dilute the shares.
- High-frequency share: the fraction of energy at ``r >= 0.5`` (the upper half of the
  radial range; with an even ``num_bands`` exactly the sum of the upper half of the
  bands), averaged like the bands.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=32)
def _dct_matrix_cpu(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def dct_matrix(n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix (n, n): ``coefficients = dct_matrix(n) @ signal``."""
    return _dct_matrix_cpu(n).to(device=device, dtype=dtype)


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2D DCT-II over the last two dimensions of (..., H, W)."""
    h, w = x.shape[-2:]
    d_h = dct_matrix(h, x.device, x.dtype)
    d_w = dct_matrix(w, x.device, x.dtype)
    return d_h @ x @ d_w.transpose(0, 1)


def radial_frequency(h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    """(H, W) normalised radial frequency in [0, 1) of each DCT coefficient."""
    fy = torch.arange(h, device=device, dtype=torch.float32)[:, None] / h
    fx = torch.arange(w, device=device, dtype=torch.float32)[None, :] / w
    return torch.sqrt(fy**2 + fx**2) / math.sqrt(2.0)


@torch.no_grad()
def dct_band_energy(x: Tensor, num_bands: int = 8, exclude_dc: bool = False) -> tuple[Tensor, float]:
    """Banded DCT energy of (B, C, H, W) maps.

    ``exclude_dc``: leave out the DC coefficient (each map's mean), so the curve describes
    spatial structure only; a map's mean otherwise dominates band 0.

    Returns ``(bands, high_frequency_share)``: ``bands`` (num_bands,) fractions of energy
    per radial band (summing to 1), and the fraction of energy at normalised radial
    frequency >= 0.5, both averaged over channels and images (module docstring).
    """
    if x.dim() != 4:
        raise ValueError(f"dct_band_energy expects (B, C, H, W) maps, got shape {tuple(x.shape)}.")
    if num_bands < 1:
        raise ValueError(f"num_bands must be >= 1, got {num_bands}.")
    b, c, h, w = x.shape
    with torch.autocast(device_type=x.device.type, enabled=False):  # float64 throughout
        energy = dct2(x.detach().to(torch.float64)).pow(2).reshape(b * c, h * w)
    radius = radial_frequency(h, w, x.device).reshape(-1)
    if exclude_dc:
        energy = energy.clone()
        energy[:, 0] = 0.0
    band = (radius * num_bands).floor().long().clamp_(max=num_bands - 1)
    total = energy.sum(-1)
    keep = total > 0
    if not bool(keep.any()):
        return torch.zeros(num_bands, device=x.device), 0.0
    energy, total = energy[keep], total[keep]
    per_band = torch.zeros(energy.shape[0], num_bands, dtype=energy.dtype, device=x.device)
    per_band.index_add_(1, band, energy)
    fractions = (per_band / total[:, None]).mean(0)
    high = (energy[:, radius >= 0.5].sum(-1) / total).mean()
    return fractions.float(), float(high)
