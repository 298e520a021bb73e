"""Speed switches that change how a model runs, never what it computes.

- ``channels_last``: NHWC weights and inputs for conv tokenizers (oneDNN / cuDNN pick
  their NHWC kernels; the math is the same convolution).
- ``recompute_norm_act``: each GroupNorm -> SiLU -> conv of a conv res block keeps only its
  input and recomputes GroupNorm + SiLU in the backward pass, where the convolution's own
  backward kernel takes the recomputed input (``tokenizers.conv.norm_silu_conv``): a res
  block stores two full-size activations instead of six, and no convolution runs twice.
- ``activation_checkpointing``: transformer blocks recompute their activations in the
  backward pass instead of keeping them (less memory, about one extra forward).
- ``compile_blocks``: ``torch.compile`` each transformer block in place (state-dict keys
  unchanged, so checkpoints load either way).

Transformer blocks are the project's ``diffusion.blocks.Block`` (FlexTok, the latent
generator) and timm's ViT ``Block`` (FQGAN's adapters and heads). The module
(``training.module.TokenizerModule``) applies them from its config keys; the benchmark
(``python -m benchmarks``) measures each one on and off.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def transformer_block_types() -> tuple[type, ...]:
    from diffusion.blocks import Block

    types: list[type] = [Block]
    try:
        from timm.models.vision_transformer import Block as TimmBlock

        types.append(TimmBlock)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return tuple(types)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    types = transformer_block_types()
    return [m for m in model.modules() if isinstance(m, types)]


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC memory format for every 4-d parameter and buffer (in place; returns ``model``)."""
    return model.to(memory_format=torch.channels_last)


def images_channels_last(images: Tensor) -> Tensor:
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


class _CheckpointedForward:
    """Replaces a block's ``forward``: recompute in backward while training with grad.

    A picklable, deep-copyable callable holding the block (an EMA ``deepcopy`` gets a copy
    bound to the copied block through the memo)."""

    def __init__(self, block: nn.Module):
        self.block = block

    def __call__(self, *args, **kwargs):
        block = self.block
        original = type(block).forward
        if block.training and torch.is_grad_enabled():
            return checkpoint(original, block, *args, use_reentrant=False, **kwargs)
        return original(block, *args, **kwargs)


def recompute_norm_activations(model: nn.Module) -> int:
    """GroupNorm + SiLU recomputed in backward in every conv ``ResBlock``; returns how many."""
    from tokenizers.conv import ResBlock

    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    for block in blocks:
        block.recompute_norm_act = True
    return len(blocks)


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing on every transformer block of ``model``; returns how many."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = _CheckpointedForward(block)
    return len(blocks)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every transformer block in place; returns how many."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def accelerate(model: nn.Module, channels_last: bool = False, activation_checkpointing: bool = False,
               compile: bool = False, recompute_norm_act: bool = False) -> dict[str, int | bool]:
    """Apply the switches to ``model`` in place; returns what was applied (for the log)."""
    applied: dict[str, int | bool] = {}
    if channels_last:
        if has_convolutions(model):
            to_channels_last(model)
            applied["channels_last"] = True
        else:
            log.info("channels_last: %s has no 2D convolutions; left as is.", type(model).__name__)
    if recompute_norm_act:
        blocks = recompute_norm_activations(model)
        if blocks:
            applied["recomputed_norm_act_blocks"] = blocks
        else:  # e.g. FlexTok (transformers): activation_checkpointing is its memory switch
            log.info("recompute_norm_act: %s has no conv res blocks; left as is.", type(model).__name__)
    if activation_checkpointing:
        applied["checkpointed_blocks"] = checkpoint_blocks(model)
    if compile:
        applied["compiled_blocks"] = compile_blocks(model)
    return applied


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX, as oneDNN reports it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def warn_if_bf16_is_emulated(precision: str, accelerator: str) -> bool:
    """Log a warning when bf16-mixed will run on a CPU without bf16 units; returns True then."""
    if "bf16" not in str(precision) or accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        return False
    if cpu_has_bf16_units():
        return False
    log.warning("trainer.precision=%s on a CPU without bf16 units: bf16 is emulated and slower than fp32 here. "
                "Fix: trainer.precision=32-true.", precision)
    return True
