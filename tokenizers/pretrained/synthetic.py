"""Seeded random weights in a given layout, for parity fixtures.

A parity fixture stores a reference model's state-dict *layout* (key -> shape, in the
reference's own names) and a seed instead of the weights: ``seeded_state_dict`` rebuilds the
identical tensors in the fixture generator (which loads them into the reference model) and in
the test (which converts and loads them into the project's model). That keeps the fixtures a
few kB while the models keep every level, block and branch of the released architectures.

Each tensor is drawn from its own generator, seeded by the fixture seed and the key's CRC32,
so the values do not depend on the order of the keys. The scales keep activations of order
one through many random layers: matrices and convolution kernels ``N(0, 1/fan_in)``, 1-D
``*weight`` (norm scales) ``1 + N(0, 0.1^2)``, everything else (biases, embeddings' 1-D
parts, buffers) ``N(0, 0.1^2)``.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor


def seeded_tensor(key: str, shape: Sequence[int], seed: int) -> Tensor:
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    x = torch.randn(tuple(int(s) for s in shape), generator=generator, dtype=torch.float32)
    if len(shape) >= 2:
        return x / math.sqrt(max(1, math.prod(shape[1:])))
    if key.endswith("weight"):
        return 1.0 + 0.1 * x
    return 0.1 * x


def seeded_state_dict(layout: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]], seed: int) -> dict[str, Tensor]:
    """``{key: tensor}`` for a ``{key: shape}`` layout (see the module docstring)."""
    items = layout.items() if isinstance(layout, Mapping) else layout
    return {key: seeded_tensor(key, shape, seed) for key, shape in items}


def layout_of(state: Mapping[str, Tensor]) -> dict[str, list[int]]:
    """The ``{key: shape}`` layout of a state dict (what a fixture stores)."""
    return {key: list(value.shape) for key, value in state.items()}
