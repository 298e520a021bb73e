"""Transformer pieces shared by FlexTok (encoder and flow decoder) and the latent generator.

Everything is pre-norm. A ``Block`` is either plain (its norms may carry an affine) or
adaLN-Zero conditioned (norms without affine, shift/scale/gate produced from a
conditioning vector by a zero-initialised linear, so a freshly built block is the
identity). Attention goes through ``F.scaled_dot_product_attention`` with an explicit
boolean mask (True = may attend), which has a backward pass on CPU (FlexAttention has
not). Masks come from ``prefix_causal_mask``, which caches one tensor per (shape,
device): call it in ``forward`` freely, each mask is built once.

Positions: ``sincos_2d`` (fixed absolute embedding, added once at the input) and
``Rope2D`` (rotary, applied to q/k inside every attention layer, to the first
height * width tokens of the sequence; tokens after them, e.g. registers, are left
unrotated).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, affine: bool = True, eps: float = 1e-6) -> nn.Module:
    """LayerNorm (without bias) or RMSNorm over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=False)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"norm={kind!r} is not known; use one of {NORMS}.")


# -- masks ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def prefix_causal_mask(num_prefix: int, num_causal: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean (N, N) mask, N = num_prefix + num_causal, True where a query may attend.

    The first ``num_prefix`` tokens (FlexTok's patches) attend to each other only; causal
    token i (a register) attends to every prefix token and to causal tokens 0..i.
    Cached: the same arguments return the same tensor object (do not modify it in place).
    """
    n = num_prefix + num_causal
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:num_prefix, :num_prefix] = True
    mask[num_prefix:, :num_prefix] = True
    mask[num_prefix:, num_prefix:] = torch.ones(num_causal, num_causal, dtype=torch.bool, device=device).tril()
    return mask


# -- position embeddings --------------------------------------------------------------
def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@functools.lru_cache(maxsize=32)
def sincos_2d(dim: int, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Fixed 2D sin-cos embedding (MAE / DiT style), (height * width, dim) float32, row-major.

    Half of the channels encode the row, half the column. Cached per (shape, device):
    do not modify the result in place."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}.")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, rows.flatten()), _sincos_1d(dim // 2, cols.flatten())], dim=1)
    return emb.float().to(device)


class Rope2D(nn.Module):
    """2D rotary embedding: the first half of each head's channels rotate with the row
    index, the second half with the column index (adjacent channel pairs form the
    rotated planes). ``forward(height, width)`` returns cached (cos, sin) of shape
    (height * width, head_dim // 2) for ``apply_rope``."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"Rope2D needs head_dim divisible by 4, got {head_dim}.")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def forward(self, height: int, width: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        key = (height, width, str(device))
        if key not in self._cache:
            quarter = self.head_dim // 4
            freqs = 1.0 / self.theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)
            rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            angles = torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], dim=1)
            self._cache[key] = (angles.cos().float().to(device), angles.sin().float().to(device))
        return self._cache[key]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, N, D) by angles (n, D/2) on the first n tokens; the rest pass through."""
    n = cos.shape[0]
    head, tail = x[..., :n, :], x[..., n:, :]
    pairs = head.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([rotated, tail], dim=-2) if tail.shape[-2] else rotated


# -- layers ---------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with optional QK-norm, rotary positions and a boolean mask.

    ``scale``: the logit scale, default ``head_dim ** -0.5``; FlexTok's reference uses
    muP's ``8 / head_dim`` (the same number at head_dim 64)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, norm: str = "layernorm",
                 bias: bool = False, norm_eps: float = 1e-6, scale: float | None = None,
                 qk_norm_affine: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}.")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.q_norm = make_norm(norm, self.head_dim, qk_norm_affine, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, qk_norm_affine, norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, mask: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: 2/3 of the plain MLP's, so the parameter count matches."""
    return int(2 * mlp_ratio * dim / 3)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class AdaLNModulation(nn.Module):
    """Conditioning vector (B, C) -> ``chunks`` modulation tensors, zero-initialised.

    With ``groups > 1`` there is one set per contiguous token segment (e.g. FlexTok's
    [patches, registers]): each tensor is (B, groups, dim) and ``modulate`` / ``gated``
    apply set g to segment g given the segment sizes. Per-segment application keeps
    memory at one activation (expanding the sets to (B, N, dim) per token would keep
    six extra activations per block alive for the backward pass).
    """

    def __init__(self, cond_dim: int, dim: int, chunks: int, groups: int = 1):
        super().__init__()
        self.dim, self.chunks, self.groups = dim, chunks, groups
        self.linear = nn.Linear(cond_dim, groups * chunks * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cond: Tensor) -> list[Tensor]:
        mod = self.linear(F.silu(cond)).view(cond.shape[0], self.groups, self.chunks, self.dim)
        return list(mod.unbind(dim=2))  # each (B, groups, dim)


def _per_segment(fn, x: Tensor, params: tuple[Tensor, ...], sizes: tuple[int, ...] | None) -> Tensor:
    """Apply ``fn(segment, *params[:, g:g+1])`` to each segment g of x along the tokens."""
    groups = params[0].shape[1]
    if groups == 1:
        return fn(x, *params)
    if sizes is None or len(sizes) != groups or sum(sizes) != x.shape[1]:
        raise ValueError(f"per-segment modulation with {groups} groups needs segment sizes summing to "
                         f"{x.shape[1]} tokens, got {sizes}.")
    parts = x.split(list(sizes), dim=1)
    return torch.cat([fn(part, *(p[:, g : g + 1] for p in params)) for g, part in enumerate(parts)], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, sizes: tuple[int, ...] | None = None) -> Tensor:
    """x * (1 + scale) + shift, with (B, 1, D) or per-segment (B, G, D) parameters."""
    return _per_segment(lambda seg, b, a: seg * (1 + a) + b, x, (shift, scale), sizes)


def gated(x: Tensor, gate: Tensor, sizes: tuple[int, ...] | None = None) -> Tensor:
    return _per_segment(lambda seg, g: seg * g, x, (gate,), sizes)


class Block(nn.Module):
    """Pre-norm transformer block: attention + SwiGLU, optionally adaLN-Zero conditioned.

    ``cond_dim=None``: plain block, ``x + attn(norm(x))``, ``x + mlp(norm(x))``.
    ``cond_dim=C``: ``forward(x, cond=(B, C))`` modulates both sub-layers with shift,
    scale and a gate from a zero-initialised linear, so at init the block is the identity.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, norm: str = "layernorm",
                 norm_affine: bool = False, qk_norm: bool = True, bias: bool = False,
                 cond_dim: int | None = None, adaln_groups: int = 1, norm_eps: float = 1e-6,
                 attn_scale: float | None = None, qk_norm_affine: bool = True):
        super().__init__()
        affine = norm_affine and cond_dim is None
        self.norm1 = make_norm(norm, dim, affine=affine, eps=norm_eps)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, norm=norm, bias=bias, norm_eps=norm_eps,
                              scale=attn_scale, qk_norm_affine=qk_norm_affine)
        self.norm2 = make_norm(norm, dim, affine=affine, eps=norm_eps)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), bias=bias)
        self.modulation = AdaLNModulation(cond_dim, dim, 6, adaln_groups) if cond_dim is not None else None

    def forward(self, x: Tensor, cond: Tensor | None = None, mask: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None, segments: tuple[int, ...] | None = None) -> Tensor:
        """``segments``: token counts of the contiguous groups when ``adaln_groups > 1``."""
        if self.modulation is None:
            x = x + self.attn(self.norm1(x), mask=mask, rope=rope)
            return x + self.mlp(self.norm2(x))
        if cond is None:
            raise ValueError("this block is adaLN-conditioned: pass cond (B, cond_dim).")
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)
        h = self.attn(modulate(self.norm1(x), shift1, scale1, segments), mask=mask, rope=rope)
        x = x + gated(h, gate1, segments)
        h = self.mlp(modulate(self.norm2(x), shift2, scale2, segments))
        return x + gated(h, gate2, segments)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + norm + zero-initialised linear: the flow models' output head."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int, norm: str = "layernorm", adaln_groups: int = 1,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm = make_norm(norm, dim, affine=False, eps=norm_eps)
        self.modulation = AdaLNModulation(cond_dim, dim, 2, adaln_groups)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, cond: Tensor, segments: tuple[int, ...] | None = None) -> Tensor:
        shift, scale = self.modulation(cond)
        return self.linear(modulate(self.norm(x), shift, scale, segments))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (diffusion.flow's convention) -> (B, dim): sinusoidal features
    ``[cos, sin](time_scale * t * max_period ** (-i / half))`` followed by an MLP.

    Defaults are DiT's (time_scale 1000, max_period 10000); FlexTok's reference uses
    max_period 256 (and time_scale = 1000 / its ``max_timestep``)."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0, time_scale: float = 1000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period, self.time_scale = float(max_period), float(time_scale)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        freqs = self.time_scale * torch.exp(
            -math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p), patches in row-major order."""
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent grid {h}x{w} is not divisible by patch_size={p}.")
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, patch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of ``patchify``: (B, N, C p p) -> (B, C, height, width)."""
    b = tokens.shape[0]
    p = patch_size
    x = tokens.view(b, height // p, width // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, height, width)
