"""Convolutional encoder/decoder of the taming / LDM / LlamaGen family (SPEC.md §1).

Shared by VQGAN, FQGAN (trunk shared by all branches) and the KL VAEs: a family file
composes these blocks, it never copies them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    # GroupNorm(32) at reference widths; smaller test widths fall back to a divisor.
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=1e-6, affine=True)


def _norm_silu(norm: nn.Module, x: Tensor) -> Tensor:
    return F.silu(norm(x))


def norm_silu(norm: nn.Module, x: Tensor, recompute: bool = False) -> Tensor:
    """``silu(norm(x))``. With ``recompute`` only ``x`` is kept for the backward pass and the
    two cheap elementwise-sized ops run again there: the GroupNorm output (SiLU's saved
    input) is not stored, one full-size activation less per call for a few percent more
    time (the convolutions dominate). Same values and gradients either way."""
    if recompute and torch.is_grad_enabled() and x.requires_grad:
        return checkpoint(_norm_silu, norm, x, use_reentrant=False)
    return F.silu(norm(x))


class _NormSiLUConv(torch.autograd.Function):
    """``conv(silu(group_norm(x)))`` keeping only ``x`` for the backward pass.

    Plain autograd keeps the GroupNorm output (for SiLU) and the SiLU output (the conv's
    input, for its weight gradient): two full-size activations besides ``x``. Checkpointing
    the three ops would run the convolution twice; here the backward recomputes only the
    cheap GroupNorm + SiLU and calls the convolution's own backward kernel on the
    recomputed input, so the saving costs what ``norm_silu(recompute=True)`` costs."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, conv_weight, conv_bias, norm, conv):
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.norm, ctx.conv = norm, conv
        ctx.save_for_backward(x, norm_weight, norm_bias, conv_weight, conv_bias)
        a = F.silu(F.group_norm(x, norm.num_groups, norm_weight, norm_bias, norm.eps))
        return conv._conv_forward(a, conv_weight, conv_bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_weight, norm_bias, conv_weight, conv_bias = ctx.saved_tensors
        norm, conv = ctx.norm, ctx.conv
        needs = ctx.needs_input_grad
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip((x, norm_weight, norm_bias), needs[:3])]
            a = F.silu(F.group_norm(leaves[0], norm.num_groups, leaves[1], leaves[2], norm.eps))
            # the operands as the forward's autocast handed them to the convolution
            cast = enabled and a.dtype != dtype and torch.is_floating_point(a)
            a_in = a.to(dtype) if cast else a
            weight = conv_weight.to(dtype) if enabled else conv_weight
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(a_in.dtype), a_in.detach(), weight.detach(),
            None if conv_bias is None else [conv_bias.shape[0]], list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0, 0], conv.groups, [any(needs[:3]), needs[3], needs[4]])
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(a_in, wanted, grad_a) if wanted else ())
        gx, gnw, gnb = (next(grads) if t is not None and t.requires_grad else None for t in leaves)
        return (gx, gnw, gnb, None if grad_w is None else grad_w.to(conv_weight.dtype),
                None if grad_b is None else grad_b.to(conv_bias.dtype), None, None)


def norm_silu_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: Tensor, recompute: bool = False) -> Tensor:
    """``conv(silu(norm(x)))``; with ``recompute`` (training) only ``x`` is stored for backward
    (``_NormSiLUConv``): two full-size activations fewer per call, same values and gradients."""
    params_need_grad = any(p.requires_grad for p in (*norm.parameters(), *conv.parameters()))
    if recompute and torch.is_grad_enabled() and (x.requires_grad or params_need_grad) \
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple):
        return _NormSiLUConv.apply(x, norm.weight, norm.bias, conv.weight, conv.bias, norm, conv)
    return conv(F.silu(norm(x)))


class ResBlock(nn.Module):
    # set by training.acceleration.recompute_norm_activations (module.recompute_norm_act)
    recompute_norm_act: bool = False

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = norm_silu_conv(self.norm1, self.conv1, x, self.recompute_norm_act)
        if self.dropout.p and self.training:  # dropout between SiLU and conv2: only the norm recomputed
            h = self.conv2(self.dropout(norm_silu(self.norm2, h, self.recompute_norm_act)))
        else:
            h = norm_silu_conv(self.norm2, self.conv2, h, self.recompute_norm_act)
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (used at the lowest resolution)."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # taming's asymmetric padding keeps the exact /2 grid
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Sequential):
    """Res - Attn - Res at the lowest resolution."""

    def __init__(self, channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__(
            ResBlock(channels, channels, dropout, norm_groups),
            AttnBlock(channels, norm_groups),
            ResBlock(channels, channels, dropout, norm_groups),
        )


class Encoder(nn.Module):
    """Images -> feature map downsampled by ``2 ** (len(mults) - 1)``.

    ``trunk`` returns the middle-block features (``trunk_channels`` wide); ``forward``
    adds GroupNorm + SiLU + conv to ``out_channels`` (``z_channels``, doubled for a KL
    VAE's mean and log-variance with ``double_z``). ``level_attention=False``: no
    attention after the res blocks of the lowest level (LDM kl-f8 / diffusers
    AutoencoderKL: attention only in the middle block).
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 128,
        mults: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        double_z: bool = False,
        dropout: float = 0.0,
        norm_groups: int = 32,
        level_attention: bool = True,
    ):
        super().__init__()
        self.downsample_factor = 2 ** (len(mults) - 1)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        levels = []
        ch = width
        for i, m in enumerate(mults):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, width * m, dropout, norm_groups))
                ch = width * m
                if i == len(mults) - 1 and level_attention:
                    blocks.append(AttnBlock(ch, norm_groups))
            if i != len(mults) - 1:
                blocks.append(Downsample(ch))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.mid = MidBlock(ch, dropout, norm_groups)
        self.trunk_channels = ch
        self.out_channels = 2 * z_channels if double_z else z_channels
        self.norm_out = group_norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)

    def trunk(self, x: Tensor) -> Tensor:
        return self.mid(self.levels(self.conv_in(x)))

    def head(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


class Decoder(nn.Module):
    """Latent map (``z_channels``) -> images, upsampling by ``2 ** (len(mults) - 1)``.
    ``level_attention`` as in ``Encoder``."""

    def __init__(
        self,
        out_channels: int = 3,
        width: int = 128,
        mults: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 3,
        z_channels: int = 256,
        dropout: float = 0.0,
        norm_groups: int = 32,
        level_attention: bool = True,
    ):
        super().__init__()
        self.upsample_factor = 2 ** (len(mults) - 1)
        self.z_channels = z_channels
        ch = width * mults[-1]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, dropout, norm_groups)
        levels = []
        for i, m in reversed(list(enumerate(mults))):
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, width * m, dropout, norm_groups))
                ch = width * m
                if i == len(mults) - 1 and level_attention:
                    blocks.append(AttnBlock(ch, norm_groups))
            if i != 0:
                blocks.append(Upsample(ch))
            levels.append(nn.Sequential(*blocks))
        self.levels = nn.Sequential(*levels)
        self.norm_out = group_norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.levels(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))
