"""VA-VAE / LDM loss settings against the reference formulas (issue 10, item 5).

The reference (LightningDiT's ``vavae/ldm/modules/losses/contperceptual.py``) sums
L1 + LPIPS over the C*H*W elements of each image, averages over the batch, and clamps the
adaptive GAN ratio at 1e4 (VF ratio: 1e8) on that summed loss. This project averages over
pixels; the formulas below are the reference's, written out by hand.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenizers.conv import Decoder, Encoder
from tokenizers.gan import NLayerDiscriminator, PatchGANHinge
from tokenizers.losses import ReconstructionLoss
from tokenizers.vae import AutoencoderKL
from training.module import TokenizerModule


def _setup(disc_scale: float, reduction: str):
    torch.manual_seed(0)
    vae = AutoencoderKL(Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=4, double_z=True),
                        Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=4), embed_dim=4)
    disc = NLayerDiscriminator(ndf=4, n_layers=1, norm="none")
    with torch.no_grad():
        disc.net[-1].weight.mul_(disc_scale)  # a large D gradient keeps the ratio under the clamp
    gan = PatchGANHinge(disc, disc_start=0, weighting="adaptive", disc_weight=0.5, max_adaptive_weight=1e4,
                        max_adaptive_weight_reduction=reduction)
    module = TokenizerModule(vae, ReconstructionLoss(pixel="l1", perceptual_weight=0.0), gan)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    return vae, gan, module, images


def _reference_effective_gan_weight(vae, gan, out, images) -> tuple[float, float]:
    """(the reference's d_weight, divided by C*H*W; the unclamped reference ratio)."""
    last = vae.decoder_last_layer()
    rec = out.reconstruction
    nll_sum = torch.abs(images - rec).sum() / images.shape[0]  # torch.sum(nll) / nll.shape[0]
    g_loss = -gan.discriminator(rec).mean()
    nll_grads = torch.autograd.grad(nll_sum, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    ratio = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    d_weight = torch.clamp(ratio, 0.0, 1e4).detach() * 0.5  # times disc_weight
    # the reference's objective is C*H*W times this project's: its weight, in our units
    return d_weight.item() / images[0].numel(), ratio.item()


@pytest.mark.parametrize("disc_scale, clamp_binds", [(1e3, False), (1.0, True)])
def test_summed_clamp_reproduces_the_reference_effective_gan_weight(disc_scale, clamp_binds):
    vae, gan, module, images = _setup(disc_scale, "sum")
    out = vae(images)
    losses, logs = module.compute_losses(images, out, step=0, tokenizer=vae)
    expected, ratio = _reference_effective_gan_weight(vae, gan, out, images)
    assert (ratio > 1e4) == clamp_binds  # the example is in the regime it claims
    g = -gan.discriminator(out.reconstruction).mean()
    assert (logs["gan_adaptive_weight"] * gan.disc_weight).item() == pytest.approx(expected, rel=1e-4)
    assert losses["gan"].item() == pytest.approx(expected * g.item(), rel=1e-4)


def test_mean_clamp_differs_from_the_reference_where_the_clamp_binds():
    vae, gan, module, images = _setup(1.0, "mean")
    out = vae(images)
    _, logs = module.compute_losses(images, out, step=0, tokenizer=vae)
    expected, _ = _reference_effective_gan_weight(vae, gan, out, images)
    assert (logs["gan_adaptive_weight"] * gan.disc_weight).item() > 10 * expected


def test_summed_clamp_is_about_0_05_at_256_px():
    from tokenizers.contract import AdaptiveTerm

    term = AdaptiveTerm(torch.zeros(()), torch.zeros(1), weight=0.5, max_weight=1e4, max_weight_reduction="sum")
    assert term.max_weight_for(torch.zeros(1, 3, 256, 256)) == pytest.approx(1e4 / 196608)
    assert term.max_weight_for(torch.zeros(1, 3, 64, 64)) == pytest.approx(1e4 / 12288)  # per step's size


def test_unknown_clamp_reduction_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="'mean'.*'sum'"):
        PatchGANHinge(NLayerDiscriminator(ndf=4, n_layers=1), max_adaptive_weight_reduction="pixels")


def test_vavae_vf_term_carries_the_reference_clamp_on_a_summed_loss():
    from tokenizers.vae import VAVAE
    from tokenizers.teachers import build_random_teacher

    vavae = VAVAE(Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=4, double_z=True),
                  Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=4),
                  teacher=build_random_teacher("vf_clamp_test"), embed_dim=4,
                  max_adaptive_weight=1e8, max_adaptive_weight_reduction="sum")
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    term = vavae(images).adaptive["vf"]
    assert term.max_weight_for(images) == pytest.approx(1e8 / (3 * 16 * 16))


@pytest.mark.parametrize("experiment", ["vae_f16d32_in1k256", "vavae_stage1", "vavae_stage3"])
def test_reference_experiments_use_the_reference_clamps(experiment):
    from hydra import compose, initialize_config_dir

    from helpers import ROOT

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "init_from=/ckpt"])
    assert (cfg.gan.max_adaptive_weight, cfg.gan.max_adaptive_weight_reduction) == (1e4, "sum")
    if experiment.startswith("vavae"):
        assert (cfg.tokenizer.max_adaptive_weight, cfg.tokenizer.max_adaptive_weight_reduction) == (1e8, "sum")
        assert cfg.tokenizer.teacher_input == "raw_bilinear"


def test_teacher_features_equal_the_references_dynamic_size_dinov2_on_raw_input(tmp_path):
    """LightningDiT builds DINOv2 as published (518 px position embeddings) with
    ``dynamic_img_size=True`` and feeds it ``interpolate(x, 224, bilinear)`` of the raw
    [-1, 1] images; the project resamples the embeddings to 224 px when loading. Same features
    (DINOv2-S/14 here: the same code path as ViT-L, cheaper)."""
    import timm
    from safetensors.torch import save_file

    from tokenizers import teachers

    torch.manual_seed(0)
    published = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)  # 518 px
    with torch.no_grad():
        published.pos_embed.normal_(0, 0.5)  # a position embedding that matters
    save_file(published.state_dict(), str(tmp_path / "model.safetensors"))
    reference = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                  dynamic_img_size=True).eval()
    reference.load_state_dict(published.state_dict())
    teachers.clear_cache()
    ours = teachers.get_teacher({"name": "dinov2_s", "weights": str(tmp_path / "model.safetensors"), "random": False})
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        expected = reference.forward_features(F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))
        got = ours(x, input_mode="raw_bilinear")
    teachers.clear_cache()
    assert got.grid == (16, 16)
    torch.testing.assert_close(got.patches, expected[:, 1:], atol=1e-4, rtol=1e-4)
