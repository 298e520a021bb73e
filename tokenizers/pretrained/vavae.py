"""LightningDiT's VA-VAE (``vavae-imagenet256-f16d32-dinov2.pt``) as the project's ``VAVAE``.

The release is LDM's ``AutoencoderKL`` (the taming/LDM conv encoder and decoder, f16,
32 latent channels) trained with the VF loss against DINOv2 ViT-L. The project's
``conf/tokenizer/vavae.yaml`` (on ``vae.yaml``) *is* that architecture: the release is built
from those configs, so its parity test also checks them. The layouts differ in names only;
the converter renames and stacks, nothing else:

    {encoder,decoder}.mid.block_1 / attn_1 / block_2   -> .mid.0 / .mid.1 / .mid.2
    encoder.down.{i}.block.{j}       -> encoder.levels.{i}.{position of block j}
    encoder.down.{i}.attn.{j}        -> encoder.levels.{i}.{position of attn j}
    encoder.down.{i}.downsample      -> encoder.levels.{i}.{last}
    decoder.up.{i}.block / attn / upsample -> decoder.levels.{L-1-i}.{...}  (LDM stores the
                                        decoder levels finest first, the project in the
                                        order they run: coarsest first)
    *.nin_shortcut                   -> *.skip
    attention q, k, v (1x1 convs)    -> qkv (stacked, q first); proj_out -> proj
    quant_conv, post_quant_conv, conv_in, norm_out, conv_out: unchanged
    linear_proj.weight               -> vf_projection.weight (VA-VAE's reverse projection,
                                        latent -> DINOv2 width, no bias)
    loss.*, foundation_model.*       -> ignored and reported (discriminator, LPIPS, the
                                        frozen DINOv2: training-only)

The file is a Lightning checkpoint whose ``state_dict`` holds these keys (a bare state dict
works too). Parity against the reference code: ``tests/test_parity_vae.py`` (reduced width)
and ``scripts/parity/vavae_fullsize_check.py`` (the released widths); docs/pretrained.md.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from tokenizers.pretrained.common import Release, conv_levels, load_exact, read_state_dict, ready, resolve_file

log = logging.getLogger(__name__)

HUB_ID = "hustvl/vavae-imagenet256-f16d32-dinov2"
CONF_TOKENIZER = Path(__file__).resolve().parents[2] / "conf" / "tokenizer"

#: file keys deliberately not loaded: the loss module (discriminator, LPIPS, logvar) and the
#: frozen DINOv2 teacher (built by the project from its own weights when the VF loss needs it)
TRAINING_ONLY = re.compile(r"^(loss|foundation_model)\.")

_MID = {"block_1": "0", "attn_1": "1", "block_2": "2"}
_BLOCK = re.compile(r"^(?P<part>encoder|decoder)\.(?:down|up)\.(?P<level>\d+)\.(?P<kind>block|attn)\.(?P<j>\d+)\.(?P<rest>.+)$")
_RESAMPLE = re.compile(r"^(?P<part>encoder|decoder)\.(?:down|up)\.(?P<level>\d+)\.(?:downsample|upsample)\.(?P<rest>.+)$")
_ATTN = re.compile(r"^(?P<module>.+)\.(?P<which>q|k|v)\.(?P<param>weight|bias)$")


# -- the converter -------------------------------------------------------------------------------
def _stack_qkv(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``X.q.*``, ``X.k.*``, ``X.v.*`` -> ``X.qkv.*`` in q, k, v order (how ``conv.AttnBlock``
    splits its output channels)."""
    groups: dict[tuple[str, str], dict[str, Tensor]] = defaultdict(dict)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _ATTN.match(key)
        if m and key.startswith(("encoder.", "decoder.")):
            groups[(m["module"], m["param"])][m["which"]] = value
        else:
            out[key] = value
    for (module, param), parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"Attention {module}: the file has only {sorted(parts)} of q, k, v for its {param}.")
        out[f"{module}.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An LDM ``AutoencoderKL`` (VA-VAE) state dict -> the project's ``VAVAE`` keys.
    Keys it does not know pass through unchanged (``load_exact`` then reports them)."""
    levels = conv_levels(state, _BLOCK, "block")
    num_levels = {part: 1 + max((lvl for (p, lvl) in levels if p == part), default=-1) for part in ("encoder", "decoder")}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _BLOCK.match(key) or _RESAMPLE.match(key)
        if m:
            part, level = m["part"], int(m["level"])
            n_blocks, has_attn = levels.get((part, level), (0, False))
            step = 2 if has_attn else 1
            if "kind" in m.groupdict():
                pos = int(m["j"]) * step + (1 if m["kind"] == "attn" else 0)
            else:
                pos = n_blocks * step  # the down/upsample closes the level
            index = level if part == "encoder" else num_levels[part] - 1 - level
            key = f"{part}.levels.{index}.{pos}.{m['rest']}"
        else:
            key = re.sub(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.",
                         lambda mm: f"{mm[1]}.mid.{_MID[mm[2]]}.", key)
        if key.startswith(("encoder.", "decoder.")):
            key = key.replace(".nin_shortcut.", ".skip.").replace(".proj_out.", ".proj.")
        if key == "linear_proj.weight":
            key = "vf_projection.weight"
        out[key] = value
    return _stack_qkv(out)


# -- building the release ------------------------------------------------------------------------
def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def build(vf: bool = True, teacher: Mapping[str, Any] | None = None, width: int = 128,
          mults: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, embed_dim: int = 32):
    """The project's model from ``conf/tokenizer/vae.yaml`` + ``vavae.yaml`` at the released
    architecture (random weights). ``vf=False``: the plain ``AutoencoderKL`` (the VF
    projection is then ignored). The reduced-width parity fixtures pass smaller sizes;
    LDM's ``num_res_blocks`` builds one more block per decoder level."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_TOKENIZER / "vae.yaml")
    if vf:
        extra = OmegaConf.load(CONF_TOKENIZER / "vavae.yaml")
        extra.pop("defaults", None)
        cfg = OmegaConf.merge(cfg, extra)
        # lazy: encoding and decoding never load DINOv2; the VF loss (fine-tuning) does
        cfg.teacher = dict(teacher or {"name": "dinov2_l", "weights": None, "random": False})
    mults = list(mults)
    cfg = OmegaConf.merge(cfg, {
        "encoder": {"width": width, "mults": mults, "num_res_blocks": num_res_blocks, "z_channels": embed_dim},
        "decoder": {"width": width, "mults": mults, "num_res_blocks": num_res_blocks + 1, "z_channels": embed_dim},
        "embed_dim": embed_dim,
    })
    return instantiate(cfg, _convert_="all")


def load_state(model, state: Mapping[str, Tensor], source: str):
    """Convert an LDM/VA-VAE state dict and load it into ``model`` exactly."""
    converted = convert(state)
    has_vf = hasattr(model, "vf_projection")
    if has_vf and "vf_projection.weight" not in converted:
        log.warning("%s holds no linear_proj.weight: the VF projection keeps its random initialisation "
                    "(fine for encoding and decoding; fine-tuning with the VF loss starts it afresh).", source)

    def ignore(key: str) -> bool:
        return bool(TRAINING_ONLY.match(key)) or (not has_vf and key == "vf_projection.weight")

    model.ignored_keys = load_exact(model, converted, source, ignore=ignore,
                                    optional=lambda k: k == "vf_projection.weight")
    return ready(model)


def _load_release(path=None, *, vf: Any = True, teacher: Any = None, teacher_weights: str | None = None, **arch: Any):
    """``options``: ``vf`` (false: a plain AutoencoderKL), ``teacher`` (a teacher name or spec for the
    VF loss, default dinov2_l), ``teacher_weights`` (its weight file); ``width``, ``mults``,
    ``num_res_blocks``, ``embed_dim`` (reduced-width checks only)."""
    unknown = set(arch) - {"width", "mults", "num_res_blocks", "embed_dim"}
    if unknown:
        raise TypeError(f"vavae_f16d32 options are vf, teacher, teacher_weights; got {sorted(unknown)}.")
    # values from a ``pretrained:`` spec string arrive as text
    arch = {k: (tuple(int(m) for m in str(v).strip("()[]").split(",")) if k == "mults" else int(v))
            for k, v in arch.items()}
    if isinstance(teacher, str):
        teacher = {"name": teacher, "weights": teacher_weights, "random": False}
    elif teacher is None and teacher_weights:
        teacher = {"name": "dinov2_l", "weights": teacher_weights, "random": False}
    release = RELEASES["vavae_f16d32"]
    file = resolve_file(release, path, hub_id=HUB_ID)
    model = build(vf=_flag(vf), teacher=teacher, **arch)
    return load_state(model, read_state_dict(file, keys=("state_dict",)), str(file))


RELEASES = {
    "vavae_f16d32": Release(
        name="vavae_f16d32",
        family="AutoencoderKL",
        files=("vavae-imagenet256-f16d32-dinov2.pt",),
        published=f"https://huggingface.co/{HUB_ID} (file vavae-imagenet256-f16d32-dinov2.pt); "
                  "code github.com/hustvl/LightningDiT",
        build=_load_release,
        notes="LDM AutoencoderKL layout (Lightning state_dict); returned as the project's VAVAE",
        options={"vf": "false: a plain AutoencoderKL without the VF projection",
                 "teacher": "teacher name for the VF loss when fine-tuning (default dinov2_l)",
                 "teacher_weights": "DINOv2 ViT-L weight file (fine-tuning only; never needed to encode/decode)"},
    ),
}
