"""The check outside the project (issue 10): a FULL-SIZE released FlexTok architecture,
built by Apple's reference code with random weights, saved in the release layouts, loaded
through ``load_pretrained`` and compared with the reference on the same inputs.

    git clone https://github.com/apple/ml-flextok /tmp/ml-flextok
    # a Python with torch, the reference's dependencies (einops diffusers mup hydra-core
    # safetensors huggingface_hub) and the project's (run from the repository root):
    python scripts/parity/flextok_fullsize.py --ref /tmp/ml-flextok --name flextok_d12_d12 --work /tmp/flextok_full
    python scripts/parity/flextok_fullsize.py --ref /tmp/ml-flextok --name flextok_d18_d28 --shapes-only

Full check: the release architecture (``--name``: d12-d12, d18-d18 or d18-d28; 256
registers, FSQ [8,8,8,5,5,5], head_dim 64) over the full-size 16-channel f8 VAE of the
reference's ``VAE_BASE_CFG`` (diffusers AutoencoderKL, 128/256/512/512 channels), every
weight random; ``--images`` 256 px images are tokenized by both (token agreement) and
decoded from the first k tokens (``--k``) from the same noise at the reference's decode
settings (20 steps, guidance 7.5, APG; ``--steps`` to shorten on a slow machine), max abs
difference reported. The reference outputs are kept in ``<work>/reference_outputs.safetensors``
and reused by a rerun with the same arguments (the project side alone). Results go to
``<work>/results.json`` and stdout; the exit status is 0
only if the tokens agree >= 99.9 % and every image is within 1e-3.

``--shapes-only``: builds the reference model on the meta device (no memory, no compute),
and checks that the project's converter and model take every tensor of the release layout
with the right shape (for sizes the machine cannot run, e.g. d18-d28's 3B parameters).
The reference runs with its dense SDPA fallback on CPU; the project model too (fp32).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # the project runs from the repository root (never installed)
from flextok_reference import (import_reference, randomize, reference_config, reference_decode,  # noqa: E402
                               reference_tokenize, save_release_layout, use_dense_attention)

SIZES = {
    "flextok_d12_d12": dict(enc_dim=768, enc_depth=12, dec_dim=768, dec_depth=12),
    "flextok_d18_d18": dict(enc_dim=1152, enc_depth=18, dec_dim=1152, dec_depth=18),
    "flextok_d18_d28": dict(enc_dim=1152, enc_depth=18, dec_dim=1792, dec_depth=28),
}
SCALING_FACTOR = 0.8  # any value but 1: the released VAE's factor is read from its config


def shapes_only(name: str) -> dict:
    """Meta-device reference (FlexTok and its full-size VAE) -> converters -> the project's
    model on the meta device: every tensor placed, every shape equal (no memory, no compute)."""
    from flextok.model.utils.posembs import build_2d_sincos_posemb
    from flextok.vae_wrapper import VAE_BASE_CFG

    from tokenizers.flextok import FlexTok
    from tokenizers.pretrained.flextok import architecture, convert_flextok, convert_vae, vae_architecture
    from tokenizers.vae import AutoencoderKL

    from diffusers.models import AutoencoderKL as DiffusersAutoencoderKL
    from hydra.utils import instantiate

    config = reference_config(**SIZES[name], vae_scaling_factor=SCALING_FACTOR)
    vae_config = dict(VAE_BASE_CFG, latent_channels=16, scaling_factor=SCALING_FACTOR)
    linspace = torch.linspace  # FlexTransformer reads its drop-path rates with .item(): keep those on the CPU
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        with torch.device("meta"):
            parts = {"encoder": instantiate(config["encoder"]), "decoder": instantiate(config["decoder"]),
                     "vae.vae": DiffusersAutoencoderKL.from_config(vae_config)}
            ours_vae = AutoencoderKL(**vae_architecture(vae_config))
    finally:
        torch.linspace = linspace
    full_state = {f"{prefix}.{k}": v for prefix, part in parts.items() for k, v in part.state_dict().items()}
    state = {k: v for k, v in full_state.items() if not k.startswith("vae.")}
    for key, value in state.items():  # the fixed sin-cos tables are checked by value: give them values
        if key.endswith(("enc_posemb_module.posembs", "dec_patches_posemb_module.posembs")):
            state[key] = build_2d_sincos_posemb(value.shape[2], value.shape[3], embed_dim=value.shape[1])
    arch = architecture(json.loads(json.dumps(config)))
    converted, used = convert_flextok(state, arch, 16, SCALING_FACTOR)
    vae_state = convert_vae({k[len("vae.vae."):]: v for k, v in full_state.items() if k.startswith("vae.vae.")},
                            vae_config["layers_per_block"])
    with torch.device("meta"):
        ours = FlexTok(vae=ours_vae, image_size=256, repa_weight=0.0, teacher=None, latent_scale=SCALING_FACTOR,
                       **arch)
    result = {"name": name, "mode": "shapes-only", "architecture": arch,
              "reference_parameters": sum(v.numel() for v in state.values()),
              "reference_vae_parameters": sum(v.numel() for v in vae_state.values())}
    for part, own, theirs in (("flextok", ours.state_dict(), converted), ("vae", ours_vae.state_dict(), vae_state)):
        result[part] = {
            "tensors": len(theirs),
            "missing": sorted(k for k in own if k not in theirs),
            "unexpected": sorted(k for k in theirs if k not in own),
            "mismatched": sorted(f"{k}: {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in theirs
                                 if k in own and theirs[k].shape != own[k].shape),
        }
    result["unused_reference"] = sorted(k for k in state if k not in used)
    result["ok"] = not result["unused_reference"] and not any(
        result[part][key] for part in ("flextok", "vae") for key in ("missing", "unexpected", "mismatched"))
    return result


def run_reference(name: str, work: Path, n_images: int, ks: list[int], steps: int) -> dict:
    """Build, save (release layouts) and run the reference; its outputs go to
    ``<work>/reference_outputs.safetensors`` so the project side can be rerun alone."""
    from diffusers.models import AutoencoderKL
    from flextok.flextok_wrapper import FlexTokFromHub
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    timings = {}
    start = time.perf_counter()
    config = reference_config(**SIZES[name], vae_scaling_factor=SCALING_FACTOR)
    reference = FlexTokFromHub(config).eval()  # its VAE: VAE_BASE_CFG, 16 latent channels, full size
    vae: AutoencoderKL = reference.vae.vae
    vae.register_to_config(scaling_factor=SCALING_FACTOR)
    vae.decoder.conv_out.weight.mul_(0.3)  # decoded images mostly inside [-1, 1] (FlexTok clamps)
    randomize(reference.encoder, generator)
    randomize(reference.decoder, generator)
    use_dense_attention(reference)
    save_release_layout(reference, vae, config, work)
    timings["build_and_save_s"] = time.perf_counter() - start

    images = torch.rand(n_images, 3, 16, 16, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(images, size=256, mode="bilinear", align_corners=False)
    images = (images + 0.1 * torch.randn(n_images, 3, 256, 256, generator=generator)).clamp(-1, 1)
    noise = torch.randn(n_images, 16, 32, 32, generator=generator)
    start = time.perf_counter()
    tokens_ref = reference_tokenize(reference, images)
    timings["reference_tokenize_s"] = time.perf_counter() - start
    decoded_ref = {}
    for k in ks:
        start = time.perf_counter()
        decoded_ref[k] = reference_decode(reference, tokens_ref, noise, k, steps=steps)
        timings[f"reference_decode_k{k}_s"] = time.perf_counter() - start
    params = sum(p.numel() for p in reference.parameters())
    outputs = {"images": images, "noise": noise, "tokens": tokens_ref, **{f"decoded_k{k}": v for k, v in decoded_ref.items()}}
    meta = {"name": name, "ks": ks, "steps": steps, "images": n_images, "parameters": params, "timings": timings}
    save_file({k: v.contiguous() for k, v in outputs.items()}, str(work / "reference_outputs.safetensors"),
              metadata={"meta": json.dumps(meta)})
    del reference, vae
    gc.collect()
    return meta


def full(name: str, work: Path, n_images: int, ks: list[int], steps: int) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tokenizers.pretrained import load_pretrained

    torch.set_grad_enabled(False)
    saved = work / "reference_outputs.safetensors"
    wanted = {"name": name, "ks": ks, "steps": steps, "images": n_images}
    meta = None
    if saved.exists():
        with safe_open(str(saved), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        if {k: meta[k] for k in wanted} != wanted:
            meta = None
    if meta is None:
        meta = run_reference(name, work, n_images, ks, steps)
    else:
        print(f"reusing the reference outputs in {saved}")
    outputs = load_file(str(saved))
    images, noise, tokens_ref = outputs["images"], outputs["noise"], outputs["tokens"]
    decoded_ref = {k: outputs[f"decoded_k{k}"] for k in ks}
    params, timings = meta["parameters"], dict(meta["timings"])

    start = time.perf_counter()
    ours = load_pretrained(name, work / "model", vae=work / "vae", decode_steps=steps)
    timings["load_pretrained_s"] = time.perf_counter() - start
    start = time.perf_counter()
    tokens = ours.encode(images)
    timings["project_encode_s"] = time.perf_counter() - start
    result = {"name": name, "mode": "full", "reference_parameters_incl_vae": params, "images": n_images,
              "image_size": 256, "steps": steps, "guidance": 7.5, "guidance_method": "apg",
              "token_agreement": float((tokens == tokens_ref).float().mean()), "max_abs_diff": {}}
    for k in ks:
        start = time.perf_counter()
        decoded = ours.decode(tokens_ref[:, :k], noise=noise)
        timings[f"project_decode_k{k}_s"] = time.perf_counter() - start
        reference_images = decoded_ref[k].clamp(-1, 1)
        result["max_abs_diff"][str(k)] = float((decoded - reference_images).abs().max())
        result.setdefault("saturated_fraction", {})[str(k)] = float((reference_images.abs() >= 1).float().mean())
    result["timings"] = {k: round(v, 1) for k, v in timings.items()}
    result["ok"] = result["token_agreement"] >= 0.999 and all(v <= 1e-3 for v in result["max_abs_diff"].values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="path of a local clone of github.com/apple/ml-flextok")
    parser.add_argument("--name", default="flextok_d12_d12", choices=sorted(SIZES))
    parser.add_argument("--work", default="/tmp/flextok_fullsize", help="where the release-layout files go")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--k", type=int, nargs="+", default=[256, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shapes-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import_reference(args.ref)
    work = Path(args.work) / args.name
    if args.shapes_only:
        result = shapes_only(args.name)
    else:
        work.mkdir(parents=True, exist_ok=True)
        result = full(args.name, work, args.images, args.k, args.steps)
        (work / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
