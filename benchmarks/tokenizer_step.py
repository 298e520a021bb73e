"""One training step of a tokenizer at its reference architecture: forward, losses,
backward, optimizer step, in fp32 or under bf16 autocast (CPU or CUDA).

The same step for tokbench's models (built from ``conf/`` exactly as ``train.py`` builds
them) and for the reference implementations (imported from a local clone given with
``--ref``, in this separate process; their code is never copied into the project):

- ``vqgan``: LlamaGen ``tokenizer/tokenizer_image/vq_model.py`` VQ-16;
- ``fqgan_dual`` / ``fqgan_triple``: FQGAN ``tokenizer/vq_model_{dual,triple}.py`` VQ-16 with
  representation heads and the disentanglement loss;
- ``vae``: LDM AutoencoderKL f16d32 (LightningDiT ``vavae/ldm``), Encoder + Decoder +
  1x1 convs + diagonal Gaussian, KL weight 1e-6.

Step contents, identical on both sides: MSE reconstruction + the model's own
quantizer / KL / disentanglement terms + (FQGAN) in-batch InfoNCE of each head's class
token against fixed random teacher targets. Frozen teachers, LPIPS and the
discriminator are left out on both sides (their cost does not depend on the tokenizer
code). LlamaGen / FQGAN are built with ``codebook_show_usage=False``: their usage tracker
is a Parameter-backed buffer that fails on CPU in training mode (PITFALLS.md, Models).
"""
from __future__ import annotations

import sys
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

REFERENCE_REPOS = {"vqgan": "LlamaGen", "fqgan_dual": "FQGAN", "fqgan_triple": "FQGAN", "vae": "LightningDiT"}


def info_nce(prediction, target):
    pred = F.normalize(prediction.float(), dim=-1)
    tgt = F.normalize(target.float(), dim=-1)
    return F.cross_entropy(pred @ tgt.t(), torch.arange(pred.shape[0], device=pred.device))


# -- tokbench -------------------------------------------------------------------------------
def build_tokbench(family: str, batch: int, device: torch.device, switches: dict | None = None):
    """The model as ``train.py tokenizer=<family> scale=reference`` trains it, with the
    speed switches of its config (``module.channels_last`` / ``recompute_norm_act``) unless
    ``switches`` overrides them; returns (model, loss_fn, the switches applied)."""
    from benchmarks.configs import compose_train
    from training.acceleration import accelerate

    cfg = compose_train([f"tokenizer={family}", "scale=reference"])
    applied = {key: bool(cfg.module.get(key, False)) for key in ("channels_last", "recompute_norm_act")}
    applied.update({k: v for k, v in (switches or {}).items() if k in applied})
    if family.startswith("fqgan"):
        cfg.tokenizer.load_teachers = False  # no teacher weights here: fixed random targets below
    from hydra.utils import instantiate

    model = instantiate(cfg.tokenizer).to(device)
    accelerate(model, **applied)
    if family.startswith("fqgan"):
        for branch in model.branches.values():
            if branch.teacher is not None:
                targets = torch.randn(batch, branch.teacher.embed_dim, device=device)
                branch.teacher = lambda images, t=targets: SimpleNamespace(cls=t[: images.shape[0]])

    def loss_fn(x):
        out = model(x)
        return sum(out.losses.values()) + F.mse_loss(out.reconstruction.float(), x.float())

    return model, loss_fn, applied


# -- references -----------------------------------------------------------------------------
def build_llamagen(ref_root: str, family: str, batch: int, device: torch.device):
    sys.path.insert(0, f"{ref_root}/LlamaGen")
    from tokenizer.tokenizer_image.vq_model import VQ_16

    model = VQ_16(codebook_show_usage=False).to(device)

    def loss_fn(x):
        dec, (vq, commit, entropy, _) = model(x)
        return vq + commit + entropy + F.mse_loss(dec.float(), x.float())

    return model, loss_fn


def build_fqgan(ref_root: str, family: str, batch: int, device: torch.device):
    sys.path.insert(0, f"{ref_root}/FQGAN")
    if family == "fqgan_dual":
        from tokenizer.vq_model_dual import VQ_16
    else:
        from tokenizer.vq_model_triple import VQ_16
    model = VQ_16(codebook_show_usage=False, with_clip_supervision=True, with_disentanglement=True,
                  disentanglement_ratio=0.1).to(device)
    widths = (1024,) if family == "fqgan_dual" else (384, 768)
    targets = [torch.randn(batch, w, device=device) for w in widths]

    def loss_fn(x):
        dec, *rest = model(x)
        if family == "fqgan_dual":
            emb_sem, emb_vis, disentangle, feat = rest
            vq_terms = [*emb_sem[:3], *emb_vis[:3]]
            feats = [feat]
        else:
            emb_vis, emb_mid, emb_high, disentangle, feat_mid, feat_high = rest
            vq_terms = [*emb_vis[:3], *emb_mid[:3], *emb_high[:3]]
            feats = [feat_mid, feat_high]
        semantic = sum(0.5 * info_nce(f[:, 0], t) for f, t in zip(feats, targets))
        return sum(vq_terms) + disentangle + semantic + F.mse_loss(dec.float(), x.float())

    return model, loss_fn


def build_ldm_vae(ref_root: str, family: str, batch: int, device: torch.device, resolution: int = 256):
    sys.path.insert(0, f"{ref_root}/LightningDiT/vavae")
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

    # f16d32 as configs/f16d32_ldm.yaml, attention at the lowest resolution (16 at 256 px)
    dd = dict(double_z=True, z_channels=32, resolution=resolution, in_channels=3, out_ch=3, ch=128,
              ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[resolution // 16], dropout=0.0)

    class LDMAutoencoderKL(torch.nn.Module):  # the four pieces LDM's AutoencoderKL.forward chains
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
            self.quant_conv = torch.nn.Conv2d(64, 64, 1)
            self.post_quant_conv = torch.nn.Conv2d(32, 32, 1)

        def forward(self, x):
            posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
            return self.decoder(self.post_quant_conv(posterior.sample())), posterior

    model = LDMAutoencoderKL().to(device)

    def loss_fn(x):
        dec, posterior = model(x)
        kl = posterior.kl().sum() / x.shape[0]
        return 1e-6 * kl + F.mse_loss(dec.float(), x.float())

    return model, loss_fn


REFERENCE_BUILDERS = {"vqgan": build_llamagen, "fqgan_dual": build_fqgan, "fqgan_triple": build_fqgan,
                      "vae": build_ldm_vae}


# -- the measurement -------------------------------------------------------------------------
def run(spec: dict) -> dict:
    from benchmarks.measure import time_calls

    family, impl = spec["family"], spec["impl"]
    device = torch.device(spec.get("device", "cpu"))
    batch, res = spec["batch"], spec["resolution"]
    torch.manual_seed(0)
    channels_last = False
    if impl.startswith("tokbench"):
        switches = {k: spec[k] for k in ("channels_last", "recompute_norm_act") if k in spec}
        model, loss_fn, applied = build_tokbench(family, batch, device, switches)
        channels_last = applied["channels_last"]
    else:
        builder = REFERENCE_BUILDERS[family]
        kwargs = {"resolution": res} if family == "vae" else {}
        model, loss_fn = builder(spec["ref"], family, batch, device, **kwargs)
    model.train()
    opt_kw = {"fused": True} if spec.get("fused_adam") else {"foreach": True}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                                 **opt_kw)
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = spec["precision"] == "bf16-mixed"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    result = time_calls(step, warmup=spec.get("warmup", 1), iters=spec.get("iters", 1))
    result["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    if spec.get("profile") and spec.get("device", "cpu") == "cpu":  # after the timed calls: never inside them
        from benchmarks.measure import kernel_seconds

        result["kernels"] = kernel_seconds(step)
    if impl.startswith("tokbench"):
        result["switches"] = applied
    return result
