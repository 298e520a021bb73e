"""Regenerate the FlexTok parity fixtures (tests/fixtures/parity/flextok/) from Apple's
reference code, at reduced widths with random weights, fp32 on CPU.

    git clone https://github.com/apple/ml-flextok /tmp/ml-flextok
    # a Python with torch plus the reference's dependencies (not the project's venv):
    pip install einops diffusers mup hydra-core safetensors huggingface_hub
    python scripts/parity/flextok_fixtures.py --ref /tmp/ml-flextok

What it writes (the same layouts as the releases, so the test goes through
``load_pretrained``):

- ``model/``: ``config.json`` + ``model.safetensors`` as ``FlexTokFromHub.save_pretrained``
  writes them (encoder 64 wide, decoder 64 wide, 2 blocks each, head_dim 32, 32 registers,
  separate adaLN sets for patches and registers, learned null condition);
- ``vae/``: a small diffusers ``AutoencoderKL`` (16 latent channels, downsample 8,
  scaling_factor 0.8) as ``save_pretrained`` writes it (``vae=`` of ``load_pretrained``);
- ``expected.safetensors``: input images (2, 3, 64, 64), the VAE latents the reference
  tokenizes (posterior mean x scaling_factor), its token ids (2, 32), the initial noise
  (2, 16, 8, 8), and decoded images from the first k tokens at the reference's decode
  settings (20 steps, guidance 7.5, APG) for k in 1, 5, 32, plus plain CFG (7.5) at k = 5.

The reference runs with its dense SDPA fallback (CPU has no FlexAttention kernels).
Every parameter, including the zero-initialised ones (adaLN, heads), is drawn at random so
that every weight matters for the outputs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flextok_reference import (import_reference, randomize, reference_config, reference_decode,  # noqa: E402
                               reference_tokenize, save_release_layout, use_dense_attention)

SIZES = dict(latent_channels=16, image_size=64, num_registers=32, enc_dim=64, enc_depth=2, dec_dim=64,
             dec_depth=2, head_dim=32, adaln_expansion=2, null_condition="learned")
VAE_CONFIG = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, latent_channels=16, norm_num_groups=4,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  scaling_factor=0.8, sample_size=64)
TOKEN_COUNTS = (1, 5, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="path of a local clone of github.com/apple/ml-flextok")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/parity/flextok"))
    args = parser.parse_args()
    import_reference(args.ref)
    from diffusers.models import AutoencoderKL
    from flextok.flextok_wrapper import FlexTokFromHub
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    out = Path(args.out)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    vae = AutoencoderKL(**VAE_CONFIG).eval()
    vae.decoder.conv_out.weight.mul_(0.3)  # decoded images mostly inside [-1, 1] (FlexTok clamps)

    config = reference_config(**SIZES, vae_scaling_factor=VAE_CONFIG["scaling_factor"])
    model = FlexTokFromHub(config)
    model.vae.vae = vae  # the small VAE instead of the full-size default (released: hf_hub_path)
    randomize(model.encoder, generator)
    randomize(model.decoder, generator)
    model = model.eval()
    use_dense_attention(model)
    save_release_layout(model, vae, config, out)

    images = (torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1)
    images = torch.nn.functional.interpolate(images, size=64, mode="bilinear", align_corners=False)
    images = (images + 0.1 * torch.randn(2, 3, 64, 64, generator=generator)).clamp(-1, 1)
    latents = vae.encode(images).latent_dist.mode() * VAE_CONFIG["scaling_factor"]
    tokens = reference_tokenize(model, images)
    noise = torch.randn(2, 16, 8, 8, generator=generator)
    expected = {"images": images, "latents": latents, "tokens": tokens, "noise": noise}
    for k in TOKEN_COUNTS:
        expected[f"apg_k{k}"] = reference_decode(model, tokens, noise, k)
    expected["cfg_k5"] = reference_decode(model, tokens, noise, 5, apg=False)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"),
              metadata={"sizes": json.dumps(SIZES), "vae": json.dumps(VAE_CONFIG), "decode": "20 steps, guidance 7.5"})
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB); tokens {tokens.tolist()[0][:8]}...; "
          f"|decoded| max {max(float(v.abs().max()) for k, v in expected.items() if k.startswith(('apg', 'cfg'))):.3f}")


if __name__ == "__main__":
    main()
