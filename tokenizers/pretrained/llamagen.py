"""LlamaGen's VQ tokenizers (``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``) as the project's VQGAN.

The project's ``conf/tokenizer/vqgan.yaml`` *is* LlamaGen's VQ-16 (same blocks, widths and
l2-normalised 16384 x 8 codebook); VQ-8 differs only in ``mults`` ([1, 2, 2, 4]). The file
layout differs in names only, so the converter renames and concatenates, nothing else:

    encoder.conv_blocks.{i}.res.{j}        -> encoder.levels.{i}.{position of res j}
    encoder.conv_blocks.{i}.attn.{j}       -> encoder.levels.{i}.{position of attn j}
    encoder.conv_blocks.{i}.downsample     -> encoder.levels.{i}.{last}
    decoder.conv_blocks.{i}....upsample    -> decoder.levels.{i}.{last} (same level order)
    *.nin_shortcut                         -> *.skip
    attention q, k, v (1x1 convs)          -> qkv (the three weights stacked, q first)
    attention proj_out                     -> proj
    quantize.embedding                     -> quantizer.embedding
    quantize.codebook_used                 -> ignored (a training-time usage tracker)

The parity against LlamaGen's own code is checked by ``tests/test_parity_vq.py`` (reduced
widths) and ``scripts/parity_vq_fullsize.py`` (the released widths); see docs/pretrained.md.
"""
from __future__ import annotations

import functools
import re
from collections import defaultdict
from typing import Any, Mapping

import torch
from torch import Tensor

from tokenizers.pretrained.common import (
    Release,
    conv_levels,
    load_exact,
    read_state_dict,
    ready,
    resolve_file,
    tokenizer_from_config,
)

#: LlamaGen's channel multipliers per downsampling factor (VQ_16, VQ_8 in vq_model.py)
MULTS = {16: [1, 1, 2, 2, 4], 8: [1, 2, 2, 4]}

#: file keys that are deliberately not loaded (LlamaGen's codebook-usage buffer)
TRAINING_ONLY = re.compile(r"(^|\.)codebook_used$")


def architecture(ds: int = 16, width: int | None = None, z_channels: int | None = None,
                 codebook_size: int | None = None, code_dim: int | None = None) -> dict[str, Any]:
    """Updates to ``conf/tokenizer/vqgan.yaml`` for LlamaGen's ``VQ_{ds}``: none for VQ-16 (the
    config is the release), ``mults`` for VQ-8, and the sizes given (reduced-width fixtures).
    Everything else (blocks per level, attention, l2-normalised codes) comes from the config,
    so the parity tests check the config too."""
    if ds not in MULTS:
        raise ValueError(f"LlamaGen releases downsample by 16 or 8, got ds={ds}.")
    conv: dict[str, Any] = {} if ds == 16 else {"mults": MULTS[ds]}
    if width is not None:
        conv["width"] = width
    if z_channels is not None:
        conv["z_channels"] = z_channels
    quantizer = {k: v for k, v in (("codebook_size", codebook_size), ("code_dim", code_dim)) if v is not None}
    return {"encoder": dict(conv), "decoder": dict(conv), "quantizer": quantizer}


def build(ds: int = 16, **arch: Any):
    """The project's VQGAN with LlamaGen's ``VQ_{ds}`` architecture (random weights)."""
    return tokenizer_from_config("vqgan", architecture(ds, **arch))


# -- the conv encoder / decoder (shared with FQGAN, which is built on LlamaGen's code) ------------

_BLOCK = re.compile(r"^(?P<part>encoder|decoder)\.conv_blocks\.(?P<level>\d+)\.(?P<kind>res|attn)\.(?P<j>\d+)\.(?P<rest>.+)$")
_RESAMPLE = re.compile(r"^(?P<part>encoder|decoder)\.conv_blocks\.(?P<level>\d+)\.(?:downsample|upsample)\.(?P<rest>.+)$")
_ATTN = re.compile(r"^(?P<module>.+)\.(?P<which>q|k|v)\.(?P<param>weight|bias)$")


def _rename_block(key: str) -> str:
    return key.replace(".nin_shortcut.", ".skip.").replace(".proj_out.", ".proj.")


def convert_conv(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the conv encoder/decoder keys of a LlamaGen-layout state dict (other keys pass
    through unchanged) and stack attention q/k/v into the project's qkv."""
    levels = conv_levels(state, _BLOCK, "res")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            n_res, has_attn = levels[(m["part"], int(m["level"]))]
            step = 2 if has_attn else 1
            pos = int(m["j"]) * step + (1 if m["kind"] == "attn" else 0)
            key = f"{m['part']}.levels.{m['level']}.{pos}.{m['rest']}"
        else:
            m = _RESAMPLE.match(key)
            if m:
                n_res, has_attn = levels[(m["part"], int(m["level"]))]
                key = f"{m['part']}.levels.{m['level']}.{n_res * (2 if has_attn else 1)}.{m['rest']}"
        if key.startswith(("encoder.", "decoder.")):
            key = _rename_block(key)
        out[key] = value
    return stack_qkv(out)


def stack_qkv(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``X.q.*``, ``X.k.*``, ``X.v.*`` (1x1 convs) -> ``X.qkv.*`` stacked in q, k, v order
    (the order ``conv.AttnBlock`` splits them in)."""
    groups: dict[tuple[str, str], dict[str, Tensor]] = defaultdict(dict)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _ATTN.match(key)
        if m:
            groups[(m["module"], m["param"])][m["which"]] = value
        else:
            out[key] = value
    for (module, param), parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"Attention {module}: found only {sorted(parts)} of q, k, v for its {param}.")
        out[f"{module}.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A LlamaGen ``VQModel`` state dict -> the project's ``VQGAN`` keys (training-only
    buffers kept, under their names, for ``load_exact`` to ignore and report)."""
    out = {}
    for key, value in convert_conv(state).items():
        out[re.sub(r"^quantize\.", "quantizer.", key)] = value
    return out


def load_state(model, state: Mapping[str, Tensor], source: str):
    """Convert and load a LlamaGen-layout state dict into ``model`` exactly; returns the model."""
    ignored = load_exact(model, convert(state), source, ignore=lambda k: bool(TRAINING_ONLY.search(k)))
    model.ignored_keys = ignored
    return ready(model)


#: options that shrink the architecture, for reference-format test files at reduced widths
ARCH_OPTIONS = ("width", "z_channels", "codebook_size", "code_dim")


def arch_options(release_name: str, options: Mapping[str, Any], allowed: tuple[str, ...],
                 extra: tuple[str, ...] = ()) -> dict[str, int]:
    """Integer architecture options (a ``pretrained:`` spec passes strings); anything else is an error."""
    unknown = sorted(set(options) - set(allowed) - set(extra))
    if unknown:
        raise TypeError(f"{release_name}: unknown option(s) {unknown}. Options: {', '.join(extra + allowed)} "
                        f"(the architecture ones only for reduced-width test files).")
    return {k: int(v) for k, v in options.items() if k in allowed}


def _load_release(path=None, *, release_name: str, ds: int, **options: Any):
    arch = arch_options(release_name, options, ARCH_OPTIONS)
    release = RELEASES[release_name]
    file = resolve_file(release, path, hub_id="FoundationVision/LlamaGen")
    return load_state(build(ds, **arch), read_state_dict(file), str(file))


_PUBLISHED = "https://huggingface.co/FoundationVision/LlamaGen (file {}); code github.com/FoundationVision/LlamaGen"

RELEASES = {
    f"llamagen_vq{ds}": Release(
        name=f"llamagen_vq{ds}",
        family="VQGAN",
        files=(f"vq_ds{ds}_c2i.pt",),
        published=_PUBLISHED.format(f"vq_ds{ds}_c2i.pt"),
        build=functools.partial(_load_release, release_name=f"llamagen_vq{ds}", ds=ds),
        notes=f"LlamaGen VQ-{ds}: downsample {ds}, 16384 x 8 l2-normalised codebook; weights under 'ema' "
              f"if present, else 'model' or 'state_dict' (as LlamaGen's own scripts choose).",
    )
    for ds in (16, 8)
}
