"""FQGAN's released tokenizers (``fqgan_{dual,triple}_ds{16,8}.pt``) as the project's FQGAN.

Built from ``conf/tokenizer/fqgan_dual.yaml`` / ``fqgan_triple.yaml`` (the ds8 releases change
``mults`` to [1, 2, 2, 4] and the adapters' / heads' positional grids to 32 x 32). FQGAN is
LlamaGen's VQ code with factorized branches, so the conv trunk and decoder convert exactly as
``llamagen.convert_conv``; per branch (dual: ``vis``, ``sem``; triple: ``vis``, ``sem_mid``,
``sem_high``, in the order their codes are concatenated):

    encoder.{visual_head|semantic_head*}.0   -> branches.<name>.adapter
      positional_embedding (N, C)            -> pos_embed (1, N, C)
      ln_pre / ln_post                       -> norm_in / norm_out
      transformer.{i}.ln_1 / ln_2            -> blocks.{i}.norm1 / norm2
      transformer.{i}.attn.in_proj_*         -> blocks.{i}.attn.qkv.*   (same q, k, v stacking)
      transformer.{i}.attn.out_proj          -> blocks.{i}.attn.proj
      transformer.{i}.mlp.c_fc / c_proj      -> blocks.{i}.mlp.fc1 / fc2
    encoder.norm_out_<b> / conv_out_<b>      -> branches.<name>.adapter.out_norm / out_conv
    quant_conv_<b>, quantize_<b>.embedding   -> branches.<name>.quant_conv, .quantizer.embedding
    {feat_pred_head|mid_sem_feat_pred|high_sem_feat_pred}
                                             -> branches.<name>.head (only with ``heads=True``)
      upscale.0 / upscale.2                  -> mlp.0 / mlp.2
      class_embedding (1, W)                 -> cls_token (1, 1, W)
      positional_embedding (1 + N, W)        -> pos_embed (1, 1 + N, W)

The representation heads and the codebook-usage buffers only serve training: by default
they are ignored by name and reported (``model.ignored_keys``); ``heads=True`` builds the
heads (teachers stay unloaded until a semantic loss needs them) and loads them too, for
fine-tuning a release with its semantic losses.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

from torch import Tensor

from tokenizers.pretrained.common import (Release, load_exact, read_state_dict, ready, resolve_file, tokenizer_config,
                                         tokenizer_from_config)
from tokenizers.pretrained.llamagen import arch_options, convert_conv
from tokenizers.pretrained.llamagen import architecture as llamagen_architecture

#: reference branch suffix -> (project branch name, reference head module) per variant
BRANCHES = {
    "dual": {"vis": ("visual", None), "sem": ("clip", "feat_pred_head")},
    "triple": {"vis": ("visual", None), "sem_mid": ("dino", "mid_sem_feat_pred"),
               "sem_high": ("clip", "high_sem_feat_pred")},
}
#: the reference's adapter module per branch suffix
_ADAPTER = {"vis": "visual_head", "sem": "semantic_head", "sem_mid": "semantic_head_mid",
            "sem_high": "semantic_head_high"}
_USAGE = re.compile(r"(^|\.)codebook_used$")


def architecture(variant: str = "dual", ds: int = 16, width: int | None = None, z_channels: int | None = None,
                 codebook_size: int | None = None, code_dim: int | None = None, head_width: int | None = None,
                 pos_grid: int | None = None) -> dict[str, Any]:
    """Updates to ``conf/tokenizer/fqgan_<variant>.yaml`` for FQGAN's ``VQ_{ds}``: none at ds16
    (the config is the release), ``mults`` and 32 x 32 positional grids at ds8, and the sizes
    given (reduced-width fixtures). Depths, attention heads, blocks per level and the heads'
    width (the teacher's) come from the config, so the parity tests check the config too."""
    if variant not in BRANCHES:
        raise ValueError(f"FQGAN variants are {sorted(BRANCHES)}, got {variant!r}.")
    updates = llamagen_architecture(16 if ds == 16 else ds, width, z_channels, codebook_size, code_dim)
    grid = pos_grid if pos_grid is not None else (None if ds == 16 else 256 // ds)
    updates["adapter"] = {} if grid is None else {"pos_grid": grid}
    updates["head"] = {} if grid is None else {"pos_grid": grid}
    if head_width is not None:
        updates["head"]["width"] = head_width
    return updates


def build(variant: str = "dual", ds: int = 16, heads: bool = False, teachers: Mapping[str, Any] | None = None,
          **arch: Any):
    """The project's FQGAN with the architecture of FQGAN's ``VQ_{ds}`` ``variant`` (random
    weights), branches in the config's order. Without ``heads`` the semantic branches carry
    no teacher and no head (all a released tokenizer needs to encode and decode). With
    ``heads`` they keep the config's teachers, unloaded; ``teachers`` replaces a branch's
    teacher spec (tests: random ones)."""
    cfg = tokenizer_config(f"fqgan_{variant}", architecture(variant, ds, **arch))
    expected = {name for name, _ in BRANCHES[variant].values()}
    if set(cfg.branches) != expected:
        raise ValueError(f"conf/tokenizer/fqgan_{variant}.yaml names branches {list(cfg.branches)}; "
                         f"the FQGAN-{variant} release has {sorted(expected)}.")
    cfg.load_teachers = False
    for name in list(cfg.branches):
        if not heads:
            cfg.branches[name] = {}
        elif teachers and name in teachers:
            cfg.branches[name].teacher = dict(teachers[name])
    return tokenizer_from_config(cfg)


def _rename_transformer(rest: str) -> str:
    """Keys inside an FQGAN adapter / head (OpenAI-CLIP style blocks) -> timm ``Block`` keys."""
    rest = re.sub(r"^ln_pre\.", "norm_in.", rest)
    rest = re.sub(r"^ln_post\.", "norm_out.", rest)
    rest = re.sub(r"^upscale\.", "mlp.", rest)
    m = re.match(r"^transformer\.(\d+)\.(.+)$", rest)
    if m:
        inner = m[2]
        for old, new in (("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_weight", "attn.qkv.weight"),
                         ("attn.in_proj_bias", "attn.qkv.bias"), ("attn.out_proj.", "attn.proj."),
                         ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")):
            if inner.startswith(old):
                inner = new + inner[len(old):]
                break
        rest = f"blocks.{m[1]}.{inner}"
    return rest


def convert(state: Mapping[str, Tensor], variant: str) -> dict[str, Tensor]:
    """An FQGAN ``VQModel`` state dict (``vq_model_dual.py`` / ``vq_model_triple.py``) -> the
    project's ``FQGAN`` keys. Usage buffers keep their (renamed) keys for ``load_exact`` to
    ignore; head keys are renamed into ``branches.<name>.head``."""
    if variant not in BRANCHES:
        raise ValueError(f"FQGAN variants are {sorted(BRANCHES)}, got {variant!r}.")
    branches = BRANCHES[variant]
    state = convert_conv(state)
    adapters = {f"encoder.{_ADAPTER[b]}.0.": b for b in branches}
    heads = {module: b for b, (_, module) in branches.items() if module}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        adapter = next((p for p in adapters if key.startswith(p)), None)
        head = next((h for h in heads if key.startswith(h + ".")), None)
        m = re.match(r"^encoder\.(norm_out|conv_out)_(\w+?)\.(weight|bias)$", key)
        q = re.match(r"^(quant_conv|quantize)_(\w+?)\.(.+)$", key)
        if adapter:
            name = branches[adapters[adapter]][0]
            rest = key[len(adapter):]
            if rest == "positional_embedding":
                value = value.unsqueeze(0)
            new = f"branches.{name}.adapter.{_rename_transformer(rest)}"
        elif head:
            name = branches[heads[head]][0]
            rest = key[len(head) + 1:]
            if rest == "positional_embedding":
                rest, value = "pos_embed", value.unsqueeze(0)
            elif rest == "class_embedding":
                rest, value = "cls_token", value.unsqueeze(0)
            new = f"branches.{name}.head.{_rename_transformer(rest)}"
        elif m and m[2] in branches:
            part = {"norm_out": "out_norm", "conv_out": "out_conv"}[m[1]]
            new = f"branches.{branches[m[2]][0]}.adapter.{part}.{m[3]}"
        elif q and q[2] in branches:
            part = {"quant_conv": "quant_conv", "quantize": "quantizer"}[q[1]]
            new = f"branches.{branches[q[2]][0]}.{part}.{q[3]}"
        if new.endswith(".positional_embedding"):
            new = new[: -len("positional_embedding")] + "pos_embed"
        out[new] = value
    return out


def load_state(model, state: Mapping[str, Tensor], variant: str, source: str, heads: bool = False):
    """Convert and load an FQGAN-layout state dict into ``model`` exactly; returns the model."""
    head_names = [f"branches.{name}.head." for name, module in BRANCHES[variant].values() if module]

    def ignore(key: str) -> bool:
        return bool(_USAGE.search(key)) or (not heads and key.startswith(tuple(head_names)))

    model.ignored_keys = load_exact(model, convert(state, variant), source, ignore=ignore)
    return ready(model)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise ValueError(f"heads must be true or false, got {value!r}.")
        return value.strip().lower() in {"true", "1", "yes"}
    return bool(value)


#: options that shrink the architecture, for reference-format test files at reduced widths
ARCH_OPTIONS = ("width", "z_channels", "codebook_size", "code_dim", "head_width", "pos_grid")


def _load_release(path=None, *, release_name: str, variant: str, ds: int, heads: Any = False, **options: Any):
    arch = arch_options(release_name, options, ARCH_OPTIONS, extra=("heads",))
    heads = _as_bool(heads)
    release = RELEASES[release_name]
    file = resolve_file(release, path, hub_id="ZechenBai/FQGAN")
    return load_state(build(variant, ds, heads=heads, **arch), read_state_dict(file), variant, str(file), heads=heads)


_TEACHERS = {"dual": "CLIP ViT-L/14", "triple": "DINOv2 ViT-S/14 and CLIP ViT-B/16"}

RELEASES = {
    f"fqgan_{variant}_ds{ds}": Release(
        name=f"fqgan_{variant}_ds{ds}",
        family="FQGAN",
        files=(f"fqgan_{variant}_ds{ds}.pt",),
        published=f"https://huggingface.co/ZechenBai/FQGAN (file fqgan_{variant}_ds{ds}.pt); code github.com/showlab/FQGAN",
        build=functools.partial(_load_release, release_name=f"fqgan_{variant}_ds{ds}", variant=variant, ds=ds),
        notes=f"FQGAN-{variant.capitalize()}, downsample {ds}: {len(BRANCHES[variant])} codebooks of 16384 x 8 "
              f"(semantic teachers {_TEACHERS[variant]}); 256 px (learned {256 // ds}x{256 // ds} positional "
              f"grids, resampled for other sizes). Representation heads ignored unless heads=true.",
        options={"heads": "true: also load the representation heads (fine-tuning with the semantic losses)"},
    )
    for variant in ("dual", "triple")
    for ds in (16, 8)
}
