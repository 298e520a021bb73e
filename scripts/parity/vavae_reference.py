"""Run LightningDiT's VA-VAE reference code and save a released-layout checkpoint plus its outputs.

Nothing from the reference is copied into tokbench: this script imports it at run time
from a local clone of https://github.com/hustvl/LightningDiT (``tokenizer/autoencoder.py``,
the inference code that loads ``vavae-imagenet256-f16d32-dinov2.pt``).

Two sizes:

- ``--size small`` (the parity fixtures of ``tests/test_parity_vae.py``): the same block
  structure at reduced width (ch 32, ch_mult (1, 1, 2), 2 res blocks, attention at the
  lowest resolution, 8 latent channels) with random weights rounded to fp16 so the files
  stay small (the test upcasts them to fp32; both sides then use identical weights).
- ``--size full``: the released f16d32 architecture (ch 128, ch_mult (1, 1, 2, 2, 4),
  32 latent channels) with random weights, used by ``vavae_fullsize_check.py``.

Either way it also writes the released architecture's layout (key -> shape, no weights:
``vavae_f16d32_layout.json``), which the fast suite checks the full-size model against.

Random weights: PyTorch's default init for convs, plus random GroupNorm scales and
shifts (a swapped weight/bias would otherwise go unnoticed); quant_conv's log-variance
biases are shifted so that a quarter of the channels lies above and a quarter below LDM's
clamp [-30, 20] (a missing clamp changes the fixture). The checkpoint is written as the
released file is laid out: a Lightning ``state_dict`` holding ``encoder.*``,
``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, VA-VAE's ``linear_proj.weight``
(reverse projection latent -> DINOv2 width, no bias) and a training-only ``loss.*`` key.

Regenerate the fixtures (from the tokbench repository root):

    git clone https://github.com/hustvl/LightningDiT /path/LightningDiT
    python scripts/parity/vavae_reference.py --lightningdit /path/LightningDiT \\
        --size small --out tests/fixtures/parity

(any Python with torch, torchvision, omegaconf, requests, tqdm and pillow: what the
reference module imports.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SIZES = {
    # reference constructor arguments (tokenizer/autoencoder.py Encoder / Decoder)
    "small": dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, embed_dim=8, resolution=32, vf_dim=64,
                  image_hw=(32, 40), batch=2, fp16_weights=True),
    "full": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=32, resolution=256, vf_dim=1024,
                 image_hw=(256, 256), batch=2, fp16_weights=False),
}


def build_reference(lightningdit: Path, size: dict):
    sys.path.insert(0, str(lightningdit))
    from tokenizer.autoencoder import AutoencoderKL, Decoder, Encoder  # the reference code

    # attention where the reference puts it for the released model: at the lowest resolution
    lowest = size["resolution"] // 2 ** (len(size["ch_mult"]) - 1)
    arch = dict(ch=size["ch"], ch_mult=size["ch_mult"], num_res_blocks=size["num_res_blocks"],
                resolution=size["resolution"], attn_resolutions=(lowest,), z_channels=size["embed_dim"])
    model = AutoencoderKL(embed_dim=size["embed_dim"], ch_mult=size["ch_mult"])  # the released constructor
    if size["ch"] != 128:
        # AutoencoderKL hard-codes ch=128: at reduced width swap in the reference's own
        # Encoder / Decoder built with the reduced arguments (it built the quant convs)
        model.encoder = Encoder(**arch)
        model.decoder = Decoder(**arch)
    return model.eval()


def randomize_(model: torch.nn.Module, embed_dim: int, generator: torch.Generator) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1.0 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
        # log-variance channels: the first quarter pushed above the clamp's 20, the second
        # below its -30 (so the clamp acts), the rest left at moderate values
        q = max(1, embed_dim // 4)
        model.quant_conv.bias[embed_dim:embed_dim + q] += 25.0
        model.quant_conv.bias[embed_dim + q:embed_dim + 2 * q] -= 35.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lightningdit", type=Path, required=True, help="local clone of hustvl/LightningDiT")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--out", type=Path, required=True, help="directory for the two output files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    size = SIZES[args.size]

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = build_reference(args.lightningdit.resolve(), size)
    randomize_(model, size["embed_dim"], generator)
    if size["fp16_weights"]:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())  # the weights the file stores, exactly

    state = dict(model.state_dict())
    # what the released training checkpoint holds beyond the inference model
    state["linear_proj.weight"] = torch.nn.Conv2d(size["embed_dim"], size["vf_dim"], 1, bias=False).weight.detach()
    state["loss.logvar"] = torch.zeros(())
    if size["fp16_weights"]:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}

    images = torch.rand(size["batch"], 3, *size["image_hw"], generator=generator) * 2 - 1
    latents = torch.randn(size["batch"], size["embed_dim"], size["image_hw"][0] // 2 ** (len(size["ch_mult"]) - 1),
                          size["image_hw"][1] // 2 ** (len(size["ch_mult"]) - 1), generator=generator)
    with torch.no_grad():
        posterior = model.encode(images)
        decoded_mean = model.decode(posterior.mode())
        decoded_latents = model.decode(latents)

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"vavae_{args.size}"
    torch.save({"state_dict": state}, args.out / f"{name}_release.pt")
    torch.save(
        {
            "architecture": {k: size[k] for k in ("ch", "ch_mult", "num_res_blocks", "embed_dim", "vf_dim")},
            "images": images,
            "mean": posterior.mean,
            "logvar": posterior.logvar,  # after the reference's clamp
            "decoded_mean": decoded_mean,
            "latents": latents,
            "decoded_latents": decoded_latents,
            "clamped_fraction": float(((posterior.logvar <= -30) | (posterior.logvar >= 20)).float().mean()),
        },
        args.out / f"{name}_outputs.pt",
    )
    # the released architecture's layout (names and shapes, no weights): checked in the fast suite
    with torch.device("meta"):
        full = build_reference(args.lightningdit.resolve(), SIZES["full"])
    layout = {k: list(v.shape) for k, v in full.state_dict().items()}
    layout["linear_proj.weight"] = [SIZES["full"]["vf_dim"], SIZES["full"]["embed_dim"], 1, 1]
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in layout.items())
    (args.out / "vavae_f16d32_layout.json").write_text("{\n" + lines + "\n}\n")
    print(f"wrote {args.out / (name + '_release.pt')} and {args.out / (name + '_outputs.pt')}; "
          f"logvar clamped at {float(((posterior.logvar <= -30) | (posterior.logvar >= 20)).float().mean()):.1%} "
          f"of elements")


if __name__ == "__main__":
    main()
