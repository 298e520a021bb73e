"""Finite scalar quantization (FSQ, Mentzer et al. 2023) as FlexTok uses it (SPEC.md §5).

Each of the d channels is bounded to ``L_i`` levels and rounded with a straight-through
gradient; the code is the tuple of digits, its index ``sum(digit_i * basis_i)`` with
``basis`` the cumulative product of the levels (first channel varies fastest). With
levels [8, 8, 8, 5, 5, 5] that is 64000 codes. Numerically identical to
vector-quantize-pytorch 1.32.0's ``FSQ`` (checked by tests/test_flextok.py); written
out here so the rounding runs in fp32 under any autocast and the indices are int64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def round_ste(x: Tensor) -> Tensor:
    """Round forward, identity backward."""
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    def __init__(self, levels: tuple[int, ...] | list[int] = (8, 8, 8, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        levels = [int(level) for level in levels]
        if any(level < 3 for level in levels):
            raise ValueError(f"FSQ levels must be >= 3 (a level of 2 rounds everything to one side), got {levels}.")
        self.levels_list = levels
        self.eps = eps
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), dim=0)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        """Squash z so that rounding yields exactly L values per channel.

        Even L gets a half-step offset (the grid is {-L/2, ..., L/2 - 1}), and the tanh
        input is shifted so that z = 0 still maps to the grid point 0."""
        half_l = (self.levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: Tensor) -> Tensor:
        """z (..., d) -> codes in [-1, 1] (..., d), straight-through gradient, fp32."""
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        return round_ste(self.bound(z.float())) / half_width

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        digits = (codes.float() * half_width + half_width).round().long()
        return (digits * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) int64 -> (..., d) codes in [-1, 1]."""
        if indices.dtype.is_floating_point:
            raise TypeError(f"FSQ indices must be integers, got {indices.dtype}.")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"FSQ indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}].")
        digits = (indices.long()[..., None] // self.basis) % self.levels.long()
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        return (digits.float() - half_width) / half_width

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (..., d) -> (codes (..., d) fp32 with straight-through gradient, indices (...) int64)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with levels {self.levels_list} expects {self.dim} channels last, got {tuple(z.shape)}.")
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes = self.quantize(z)
            return codes, self.codes_to_indices(codes.detach())

    def extra_repr(self) -> str:
        return f"levels={self.levels_list}, codebook_size={self.codebook_size}"
