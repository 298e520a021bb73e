"""FlexTok training step at a reduced config (issue 12): encoder depth 4, decoder depth 4,
width 768, head_dim 64, 256 registers, FSQ [8,8,8,5,5,5], 16 x 32 x 32 VAE latents,
batch 2; forward (encoder, FSQ, nested dropout, noised latents, decoder), flow MSE,
backward, Adam. The frozen VAE and the REPA teacher are left out on both sides.

- ``tokbench``: ``tokenizers.flextok.FlexTok`` on latents given directly (an identity
  "VAE" of 16 channels, downsample 8), SDPA with a cached boolean mask and no padding
  (every sequence of a batch has the same length);
- ``ml-flextok``: Apple's released modules, built by the project's
  ``scripts/parity/flextok_reference.py`` from the clone under ``--ref``, switched to their
  dense SDPA path (FlexAttention has no CPU backward): packed sequences padded to a
  multiple of 128 with materialised block masks.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

SIZES = dict(latent_channels=16, image_size=256, downsample=8, num_registers=256, width=768, depth=4, head_dim=64)


class IdentityLatents(nn.Module):
    """A stand-in 'VAE' whose latents are its input: the benchmark feeds latents directly."""

    def __init__(self, channels: int, downsample: int):
        super().__init__()
        self.channels, self.downsample = channels, downsample

    def latent_shape(self, image_size: int):
        return (self.channels, image_size // self.downsample, image_size // self.downsample)

    def encode_latents(self, x):
        return x

    def decode_latents(self, z):
        return z


def build_tokbench(spec: dict):
    from tokenizers.flextok import FlexTok

    s = SIZES
    model = FlexTok(vae=IdentityLatents(s["latent_channels"], s["downsample"]), image_size=s["image_size"],
                    latent_scale=1.0, num_registers=s["num_registers"], encoder_width=s["width"],
                    encoder_depth=s["depth"], decoder_width=s["width"], decoder_depth=s["depth"],
                    head_dim=s["head_dim"], repa_weight=0.0, nested_dropout="uniform")
    if spec.get("activation_checkpointing"):
        from training.acceleration import checkpoint_blocks

        checkpoint_blocks(model)

    def loss_fn(x):
        return sum(model(x).losses.values())

    return model, loss_fn


def build_reference(spec: dict):
    from benchmarks.configs import ROOT

    sys.path.insert(0, str(ROOT / "scripts" / "parity"))
    from flextok_reference import import_reference, reference_config, use_dense_attention

    import_reference(f"{spec['ref']}/ml-flextok")
    from hydra.utils import instantiate

    s = SIZES
    cfg = reference_config(latent_channels=s["latent_channels"], image_size=s["image_size"],
                           downsample=s["downsample"], num_registers=s["num_registers"], enc_dim=s["width"],
                           enc_depth=s["depth"], dec_dim=s["width"], dec_depth=s["depth"], head_dim=s["head_dim"])
    model = nn.ModuleDict({k: instantiate(cfg[k]) for k in ("encoder", "regularizer", "decoder",
                                                            "flow_matching_noise_module")})
    use_dense_attention(model)

    def loss_fn(x):
        data = {"vae_latents": [row[None] for row in x]}
        for key in ("encoder", "regularizer", "flow_matching_noise_module", "decoder"):
            data = model[key](data)
        prediction = torch.cat(data["vae_latents_reconst"])
        target = torch.cat(data["flow_noise"]) - x if "flow_noise" in data else x
        return F.mse_loss(prediction.float(), target.float())

    return model, loss_fn


def run(spec: dict) -> dict:
    from benchmarks.measure import time_calls

    torch.manual_seed(0)
    model, loss_fn = (build_tokbench if spec["impl"].startswith("tokbench") else build_reference)(spec)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                 **({"fused": True} if spec["impl"].startswith("tokbench") else {}))
    s = SIZES
    side = s["image_size"] // s["downsample"]
    x = torch.randn(2, s["latent_channels"], side, side)
    bf16 = spec["precision"] == "bf16-mixed"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = time_calls(step, warmup=spec.get("warmup", 1), iters=spec.get("iters", 1))
    result["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    if spec.get("profile") and spec.get("device", "cpu") == "cpu":  # after the timed calls: never inside them
        from benchmarks.measure import kernel_seconds

        result["kernels"] = kernel_seconds(step)
    return result
