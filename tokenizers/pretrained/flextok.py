"""FlexTok releases (Bachmann et al. 2025, github.com/apple/ml-flextok) -> ``tokenizers.flextok.FlexTok``.

A release is a Hugging Face model directory: ``config.json`` (the Hydra config the
reference's ``FlexTokFromHub`` instantiates: vae, encoder, decoder, regularizer, flow
matching modules) and ``model.safetensors``. The architecture is read from the config,
module by module (``encoder.module_dict.enc_*``, ``decoder.module_dict.dec_*``); anything
the project's FlexTok does not implement is refused with the module named, never
approximated. The frozen VAE comes from ``vae=`` the ``flextok_vae_c16`` directory
(diffusers ``AutoencoderKL``: ``config.json`` + ``diffusion_pytorch_model.safetensors``),
converted to the project's ``tokenizers.vae.AutoencoderKL`` (LDM layout); the
``latent_scale`` is the VAE's ``scaling_factor`` (the reference multiplies latents by it).

Conversion is renaming and reshaping only:

- separate ``wq``/``wk``/``wv`` -> one ``qkv``; SwiGLU ``fc1`` (gate), ``fc3`` (up), ``fc2``
  (down) -> ``gate_up`` / ``down``;
- adaLN rows: the reference chunks (gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp,
  scale_mlp) per sub-sequence set, the project (shift, scale, gate) x (attn, mlp);
- patch vectors: the reference flattens a patch as (row, column, channel), the project as
  (channel, row, column): the patch-embedding columns and the output-head rows are permuted;
- the learned register positions (1, 1, D, R) -> (R, D); the fixed 2D sin-cos tables in the
  file are checked against the project's and dropped;
- diffusers VAE: ``down_blocks.i.resnets.j`` -> ``levels.i.j``, ``downsamplers.0`` /
  ``upsamplers.0`` -> the level's last module, mid-block attention ``to_q/k/v`` (linear) ->
  one 1x1 ``qkv`` conv, ``conv_shortcut`` -> ``skip``.
"""
from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from tokenizers.pretrained.common import Release, StateDictMismatch, load_exact, read_state_dict, ready, resolve_file

log = logging.getLogger(__name__)

HUB = "https://huggingface.co/"
VAE_HUB_ID = "EPFL-VILAB/flextok_vae_c16"
VAE_OPTION = (f"the flextok_vae_c16 directory (diffusers AutoencoderKL: config.json + "
              f"diffusion_pytorch_model.safetensors), {HUB}{VAE_HUB_ID}")
# adaLN chunk order: the project's (shift1, scale1, gate1, shift2, scale2, gate2) taken from
# the reference's (gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp)
ADALN_FROM_REFERENCE = (2, 3, 0, 4, 5, 1)
# diffusers mid-block attention projections (current names, and the pre-0.14 ones)
QKV_NAMES = {"to_q": "q", "to_k": "k", "to_v": "v", "query": "q", "key": "k", "value": "v"}


class UnsupportedConfig(ValueError):
    """config.json describes something the project's FlexTok does not implement."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedConfig(f"FlexTok config.json: {what}. The project's FlexTok implements the released "
                                "architecture only (see tokenizers/pretrained/flextok.py).")


def _name(module: Mapping) -> str:
    return str(module.get("_target_", "")).rsplit(".", 1)[-1]


def read_config(model_dir: Path) -> dict:
    """config.json as the hub mixin writes it (the Hydra dict, possibly under ``config``)."""
    config = json.loads((model_dir / "config.json").read_text())
    if "config" in config and "encoder" not in config:
        config = config["config"]
    for key in ("encoder", "decoder", "regularizer"):
        _expect(key in config, f"no '{key}' entry (keys: {sorted(config)})")
    return config


def architecture(config: Mapping) -> dict[str, Any]:
    """FlexTok constructor arguments from the release's config.json."""
    enc, dec = config["encoder"]["module_dict"], config["decoder"]["module_dict"]
    need = {"enc_patch_emb", "enc_posemb_module", "enc_register_module", "enc_seq_packer", "enc_transformer",
            "enc_to_latents"}
    _expect(need <= set(enc), f"encoder modules {sorted(need - set(enc))} missing")
    need = {"dec_from_latents", "dec_registers_posemb_module", "dec_nested_dropout", "dec_latent_dropout",
            "dec_noise_patch_emb", "dec_patches_posemb_module", "dec_seq_packer", "dec_time_embedder",
            "dec_transformer", "dec_to_patches"}
    _expect(need <= set(dec), f"decoder modules {sorted(need - set(dec))} missing")
    order = list(dec)
    _expect(order.index("dec_registers_posemb_module") < order.index("dec_nested_dropout")
            < order.index("dec_latent_dropout"),
            "register positions, nested dropout and null condition in another order than "
            "positions -> nested dropout -> null condition")

    patch = enc["enc_patch_emb"]["patch_sizes"]
    _expect(len(set(patch)) == 1 and list(dec["dec_noise_patch_emb"]["patch_sizes"]) == list(patch),
            f"non-square or different encoder/decoder patch sizes {patch}")
    for key, kind in (("enc_posemb_module", "sincos"), ("dec_patches_posemb_module", "sincos"),
                      ("dec_registers_posemb_module", "learnable_sum")):
        _expect(enc.get(key, dec.get(key)).get("posemb_type", "sincos") == kind, f"{key} is not '{kind}'")
    _expect(enc["enc_seq_packer"].get("mask_mode") == "causal_last", "encoder mask is not 'causal_last'")
    _expect(dec["dec_seq_packer"].get("mask_mode", "full") == "full", "decoder mask is not 'full'")
    _expect(enc["enc_register_module"].get("ordering_mode", "nested") == "nested", "registers not 'nested'")

    def trunk(t: Mapping, where: str) -> tuple[int, int, int, float]:
        for flag, value in (("qkv_bias", False), ("proj_bias", False), ("mlp_bias", False), ("gated_mlp", True),
                            ("qk_norm", True)):
            _expect(t.get(flag, value) == value, f"{where}.{flag}={t.get(flag)} (the release has {value})")
        _expect("norm_layer" not in t and "act_layer" not in t, f"{where} overrides norm_layer / act_layer")
        return int(t.get("dim", 768)), int(t.get("depth", 12)), int(t.get("head_dim", 64)), float(t.get("mlp_ratio", 4.0))

    enc_dim, enc_depth, enc_head, enc_mlp = trunk(enc["enc_transformer"], "enc_transformer")
    dec_dim, dec_depth, dec_head, dec_mlp = trunk(dec["dec_transformer"], "dec_transformer")
    _expect(enc_head == dec_head and enc_mlp == dec_mlp, "encoder and decoder differ in head_dim or mlp_ratio")
    expansion = int(dec["dec_transformer"].get("adaLN_expansion", 1))
    _expect(expansion in (1, 2), f"adaLN_expansion={expansion}")
    if expansion == 2:
        _expect(dec["dec_seq_packer"].get("per_subseq_embs", False), "adaLN_expansion=2 without per_subseq_embs")
    _expect(dec["dec_to_patches"].get("adaLN_emb_read_key") is not None, "dec_to_patches has no adaLN")
    _expect(dec["dec_to_patches"].get("norm_layer", None) is None, "dec_to_patches overrides its norm_layer")

    null = dec["dec_latent_dropout"]
    if _name(null) == "LearnedNullCond":
        _expect(not null.get("replace_with_single_token", False), "LearnedNullCond replace_with_single_token=true")
        null_condition = "learned"
    else:
        _expect(_name(null) == "ZeroNullCond", f"dec_latent_dropout is {_name(null)}")
        null_condition = "zero"
    time = dec["dec_time_embedder"]
    _expect(int(time.get("frequency_embedding_size", 256)) == 256, "time frequency_embedding_size != 256")
    levels = [int(v) for v in config["regularizer"]["levels"]]
    _expect(int(enc["enc_to_latents"]["dim_out"]) == len(levels), "encoder output width != number of FSQ levels")
    return {
        "patch_size": int(patch[0]),
        "num_registers": int(enc["enc_register_module"]["n_max"]),
        "fsq_levels": levels,
        "encoder_width": enc_dim, "encoder_depth": enc_depth,
        "decoder_width": dec_dim, "decoder_depth": dec_depth,
        "head_dim": enc_head, "mlp_ratio": enc_mlp,
        "separate_register_modulation": expansion == 2,
        "null_condition": null_condition,
        "time_max_period": 256.0,  # hard-wired in the reference's TimestepEmbedder.forward
        "time_scale": 1000.0 / float(time.get("max_timestep", 1000.0)),
    }


# -- the VAE (diffusers AutoencoderKL) ---------------------------------------------------------
def vae_architecture(config: Mapping) -> dict[str, Any]:
    """``tokenizers.vae.AutoencoderKL`` keyword arguments for a diffusers AutoencoderKL config."""
    from tokenizers.conv import Decoder, Encoder

    channels = [int(c) for c in config["block_out_channels"]]
    _expect(all(c % channels[0] == 0 for c in channels), f"VAE block_out_channels {channels}")
    _expect(all(t == "DownEncoderBlock2D" for t in config.get("down_block_types", ["DownEncoderBlock2D"])),
            "VAE down blocks other than DownEncoderBlock2D")
    _expect(config.get("act_fn", "silu") == "silu" and config.get("mid_block_add_attention", True)
            and config.get("use_quant_conv", True) and config.get("use_post_quant_conv", True),
            "VAE act_fn / mid-block attention / quant convs differ from AutoencoderKL's defaults")
    mults = [c // channels[0] for c in channels]
    latent = int(config["latent_channels"])
    groups = int(config.get("norm_num_groups", 32))
    layers = int(config.get("layers_per_block", 2))
    common = dict(width=channels[0], mults=mults, z_channels=latent, norm_groups=groups, level_attention=False)
    return {"encoder": Encoder(in_channels=int(config.get("in_channels", 3)), num_res_blocks=layers,
                               double_z=True, **common),
            "decoder": Decoder(out_channels=int(config.get("out_channels", 3)), num_res_blocks=layers + 1, **common),
            "embed_dim": latent}


def _conv_from_linear(w: Tensor) -> Tensor:
    return w[:, :, None, None] if w.ndim == 2 else w


def convert_vae(state: Mapping[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> ``tokenizers.vae.AutoencoderKL`` names."""
    out: dict[str, Tensor] = {}
    attn: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".")
        new = None
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = ".".join([parts[0], "norm_out"] + parts[2:])
        elif parts[1] in ("down_blocks", "up_blocks"):
            level, kind = parts[2], parts[3]
            if kind == "resnets":
                inner = "skip" if parts[5] == "conv_shortcut" else parts[5]
                new = ".".join([parts[0], "levels", level, parts[4], inner] + parts[6:])
            elif kind in ("downsamplers", "upsamplers"):  # the module after the level's res blocks
                last = layers_per_block if kind == "downsamplers" else layers_per_block + 1
                new = ".".join([parts[0], "levels", level, str(last)] + parts[5:])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                inner = "skip" if parts[4] == "conv_shortcut" else parts[4]
                new = ".".join([parts[0], "mid", "0" if parts[3] == "0" else "2", inner] + parts[5:])
            elif parts[2] == "attentions":
                name, param = parts[4], parts[-1]
                prefix = f"{parts[0]}.mid.1"
                if name == "group_norm":
                    new = f"{prefix}.norm.{param}"
                elif name in QKV_NAMES:  # collected, then concatenated into one 1x1 conv
                    attn.setdefault(f"{prefix}.qkv.{param}", {})[QKV_NAMES[name]] = value
                    continue
                elif name in ("to_out", "proj_attn"):
                    new, value = f"{prefix}.proj.{param}", _conv_from_linear(value)
        if new is None:
            raise StateDictMismatch(f"diffusers VAE key {key!r} has no counterpart in the project's AutoencoderKL.")
        out[new] = value
    for key, qkv in attn.items():
        out[key] = _conv_from_linear(torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0))
    return out


def load_vae(vae_dir: Path):
    """The project's AutoencoderKL with the diffusers VAE's weights, and its config."""
    from tokenizers.vae import AutoencoderKL

    config = json.loads((vae_dir / "config.json").read_text())
    model = AutoencoderKL(**vae_architecture(config), encode_mode="mean")
    weights = next((vae_dir / f for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                    if (vae_dir / f).is_file()), None)
    if weights is None:
        raise StateDictMismatch(f"{vae_dir} has no diffusion_pytorch_model.safetensors. Fix: download it from "
                                f"{HUB}{VAE_HUB_ID} into that directory.")
    state = convert_vae(read_state_dict(weights), int(config.get("layers_per_block", 2)))
    load_exact(model, state, str(weights))
    return ready(model), config


# -- FlexTok -------------------------------------------------------------------------------------
def _patch_in(w: Tensor, channels: int, p: int) -> Tensor:
    """Linear weight over patch vectors (row, col, channel) -> (channel, row, col)."""
    return w.view(w.shape[0], p, p, channels).permute(0, 3, 1, 2).reshape(w.shape[0], -1)


def _patch_out(w: Tensor, channels: int, p: int) -> Tensor:
    """Output rows (row, col, channel) -> (channel, row, col); weight (N, D) or bias (N,)."""
    tail = w.shape[1:]
    return w.view(p, p, channels, *tail).permute(2, 0, 1, *range(3, 3 + len(tail))).reshape(w.shape)


def _adaln(w: Tensor, groups: int, chunks: int = 6, order=ADALN_FROM_REFERENCE) -> Tensor:
    tail = w.shape[1:]
    return w.view(groups, chunks, -1, *tail)[:, list(order)].reshape(w.shape)


def _check_sincos(table: Tensor, where: str) -> None:
    """The release stores its fixed 2D sin-cos table (1, D, h, w); it must equal the project's."""
    from diffusion.blocks import sincos_2d

    _, d, h, w = table.shape
    ours = sincos_2d(d, h, w)
    theirs = table[0].permute(1, 2, 0).reshape(h * w, d).float()
    if not torch.allclose(theirs, ours, atol=1e-5):
        raise StateDictMismatch(f"{where}: the file's 2D sin-cos table differs from the project's sincos_2d "
                                f"(max |diff| {float((theirs - ours).abs().max()):.3g}).")


def _block(take, src: str, dst: str, out: dict, adaln_groups: int | None) -> None:
    out[f"{dst}.attn.qkv.weight"] = torch.cat([take(f"{src}.attn.w{x}.weight") for x in "qkv"], dim=0)
    out[f"{dst}.attn.proj.weight"] = take(f"{src}.attn.proj.weight")
    out[f"{dst}.mlp.gate_up.weight"] = torch.cat([take(f"{src}.mlp.fc1.weight"), take(f"{src}.mlp.fc3.weight")], 0)
    out[f"{dst}.mlp.down.weight"] = take(f"{src}.mlp.fc2.weight")
    if adaln_groups is not None:
        for param in ("weight", "bias"):
            out[f"{dst}.modulation.linear.{param}"] = _adaln(take(f"{src}.adaLN_modulation.1.{param}"), adaln_groups)


def convert_flextok(state: Mapping[str, Tensor], arch: Mapping[str, Any], latent_channels: int,
                    latent_scale: float) -> tuple[dict[str, Tensor], set[str]]:
    """Reference FlexTok state dict -> the project's names; returns (converted, used file keys)."""
    e, d = "encoder.module_dict.", "decoder.module_dict."
    c, p = latent_channels, arch["patch_size"]
    groups = 2 if arch["separate_register_modulation"] else 1
    out: dict[str, Tensor] = {"latent_scale": torch.tensor(float(latent_scale))}
    used = set()

    def take(key: str) -> Tensor:
        if key not in state:
            raise StateDictMismatch(f"model.safetensors has no {key!r} (the config.json describes it).")
        used.add(key)
        return state[key]

    out["encoder.patch_embed.weight"] = _patch_in(take(e + "enc_patch_emb.patch_proj.weight"), c, p)
    out["encoder.patch_embed.bias"] = take(e + "enc_patch_emb.patch_proj.bias")
    _check_sincos(take(e + "enc_posemb_module.posembs"), "enc_posemb_module")
    out["encoder.registers"] = take(e + "enc_register_module.registers")
    for i in range(arch["encoder_depth"]):
        _block(take, f"{e}enc_transformer.blocks.{i}", f"encoder.blocks.{i}", out, None)
    out["encoder.head.weight"] = take(e + "enc_to_latents.proj.weight")
    out["encoder.head.bias"] = take(e + "enc_to_latents.proj.bias")

    out["decoder.patch_embed.weight"] = _patch_in(take(d + "dec_noise_patch_emb.patch_proj.weight"), c, p)
    out["decoder.patch_embed.bias"] = take(d + "dec_noise_patch_emb.patch_proj.bias")
    _check_sincos(take(d + "dec_patches_posemb_module.posembs"), "dec_patches_posemb_module")
    out["decoder.register_embed.weight"] = take(d + "dec_from_latents.proj.weight")
    out["decoder.register_embed.bias"] = take(d + "dec_from_latents.proj.bias")
    out["decoder.register_pos"] = take(d + "dec_registers_posemb_module.posembs")[0, 0].t()
    out["decoder.mask_token"] = take(d + "dec_nested_dropout.dropout_mask_token")
    if arch["null_condition"] == "learned":
        out["decoder.null_token"] = take(d + "dec_latent_dropout.nullcond")
    for j in (0, 2):
        for param in ("weight", "bias"):
            out[f"decoder.t_embed.mlp.{j}.{param}"] = take(f"{d}dec_time_embedder.mlp.{j}.{param}")
    for i in range(arch["decoder_depth"]):
        _block(take, f"{d}dec_transformer.blocks.{i}", f"decoder.blocks.{i}", out, groups)
    for param in ("weight", "bias"):
        out[f"decoder.final.modulation.linear.{param}"] = take(f"{d}dec_to_patches.adaLN_modulation.1.{param}")
        out[f"decoder.final.linear.{param}"] = _patch_out(take(f"{d}dec_to_patches.proj.{param}"), c, p)
    return out, used


def build_flextok(name: str, path: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                  **options: Any):
    """``load_pretrained('flextok_d*_d*', model_dir, vae=vae_dir, **FlexTok options)``."""
    from tokenizers.flextok import FlexTok

    release = RELEASES[name]
    model_dir = resolve_file(release, path, file="config.json", hub_id=HUB_IDS[name]).parent
    weights = resolve_file(release, model_dir, file="model.safetensors")
    vae_release = Release(name=f"{name} VAE", family="AutoencoderKL", files=("config.json",),
                          published=f"{HUB}{VAE_HUB_ID}", build=lambda *a, **k: None)
    vae_dir = resolve_file(vae_release, vae, option="vae", file="config.json", hub_id=VAE_HUB_ID).parent

    config = read_config(model_dir)
    arch = architecture(config)
    vae_model, vae_config = load_vae(vae_dir)
    channels = int(vae_config["latent_channels"])
    enc_in = int(config["encoder"]["module_dict"]["enc_patch_emb"]["channels_in"])
    if enc_in != channels:
        raise StateDictMismatch(f"{model_dir.name} expects a {enc_in}-channel VAE latent, {vae_dir} has {channels}. "
                                "Fix: pass vae= the flextok_vae_c16 directory.")
    vae_entry = config.get("vae", {})
    scale = vae_entry.get("scaling_factor") or vae_config.get("scaling_factor")
    if scale is None:
        raise StateDictMismatch(f"neither {model_dir}/config.json (vae.scaling_factor) nor {vae_dir}/config.json "
                                "(scaling_factor) gives the latent scale.")
    shift = vae_config.get("shift_factor") or 0.0
    kwargs = dict(vae=vae_model, latent_scale=float(scale), latent_shift=float(shift), image_size=256,
                  repa_weight=0.0, teacher=None, **arch)
    kwargs.update(options)
    model = FlexTok(**kwargs)
    # activation-checkpoint wrappers (use_act_checkpoint) may leave their prefix in the names
    state = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in read_state_dict(weights).items()}
    converted, used = convert_flextok(state, arch, channels, float(scale))
    ignored = sorted(k for k in state if k not in used)
    unknown = [k for k in ignored if not k.startswith("vae.")]
    if unknown:  # a released tensor the config does not explain: never dropped silently
        raise StateDictMismatch(f"{weights}: {len(unknown)} tensors the project's FlexTok has no place for: "
                                + ", ".join(unknown[:12]))
    load_exact(model, converted, str(weights))
    if ignored:
        log.info("%s: %d VAE tensors in model.safetensors ignored; the VAE comes from vae=%s.", weights,
                 len(ignored), vae_dir)
    model.released_vae = str(vae_dir)
    return ready(model)


HUB_IDS = {
    "flextok_d12_d12": "EPFL-VILAB/flextok_d12_d12_in1k",
    "flextok_d18_d18": "EPFL-VILAB/flextok_d18_d18_in1k",
    "flextok_d18_d28": "EPFL-VILAB/flextok_d18_d28_in1k",
}

RELEASES = {
    name: Release(
        name=name, family="FlexTok", files=("config.json", "model.safetensors"), published=HUB + hub_id,
        build=partial(build_flextok, name),
        notes=f"{name[8:].replace('_', '-')} ImageNet-1k FlexTok; frozen VAE {VAE_HUB_ID} via vae=; "
              "decode defaults as the reference (20 steps, APG guidance 7.5)",
        options={"vae": VAE_OPTION},
    )
    for name, hub_id in HUB_IDS.items()
}
