"""AutoencoderKL and VA-VAE: contract facts, posterior, KL, VF loss terms, adaptive weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.contract import AdaptiveTerm
from tokenizers.conv import Decoder, Encoder
from tokenizers.teachers import TeacherFeatures
from tokenizers.vae import (
    AutoencoderKL,
    DiagonalGaussian,
    VAVAE,
    marginal_cosine_loss,
    marginal_distance_matrix_loss,
)


def tiny_parts(z_channels: int = 4):
    # downsample 2 (mults of length 2): 16 px images -> 8x8 latents
    encoder = Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=z_channels, double_z=True)
    decoder = Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=z_channels)
    return encoder, decoder


def tiny_vae(**kwargs) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(*tiny_parts(), embed_dim=3, **kwargs)


class FixedTeacher(nn.Module):
    """Teacher stand-in returning given patch features (B, N, D) on a grid."""

    def __init__(self, patches: torch.Tensor, grid: tuple[int, int]):
        super().__init__()
        self.register_buffer("patches", patches)
        self.grid = grid
        self.embed_dim = patches.shape[-1]

    def forward(self, images, input_mode="normalized"):
        p = self.patches[: images.shape[0]]
        return TeacherFeatures(cls=p.mean(1), patches=p, grid=self.grid)


# -- AutoencoderKL ------------------------------------------------------------------------------
def test_vae_reports_continuous_latent_facts():
    vae = tiny_vae()
    assert vae.discrete is False
    assert vae.codebook_sizes == ()
    assert vae.token_shape(16) == (8, 8)
    assert vae.latent_shape(16) == (3, 8, 8)
    assert vae.bits_per_image(16) is None


def test_encode_returns_latents_that_decode_to_images():
    vae = tiny_vae().eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, *vae.latent_shape(16))
    assert torch.equal(z, vae.encode_latents(x))
    assert vae.decode(z).shape == x.shape


def test_encode_mode_mean_is_deterministic_and_sample_is_not():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    vae = tiny_vae(encode_mode="mean")
    assert torch.equal(vae.encode(x), vae.encode(x))
    assert torch.equal(vae.encode(x), vae.posterior(x).mean)
    vae.encode_mode = "sample"
    assert not torch.equal(vae.encode(x), vae.encode(x))


def test_training_forward_decodes_a_sample_and_eval_forward_the_mean():
    vae = tiny_vae()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    vae.train()
    assert not torch.equal(vae(x).latents, vae(x).latents)
    vae.eval()
    out = vae(x)
    assert torch.equal(out.latents, vae.posterior(x).mean)
    assert torch.allclose(out.reconstruction, vae.decode_latents(out.latents))


def test_kl_term_is_the_weighted_closed_form_summed_over_latent_and_averaged_over_batch():
    vae = tiny_vae(kl_weight=1e-6)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = vae(x)
    post = vae.posterior(x)
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)).mean()
    assert out.losses["kl"].item() == pytest.approx(1e-6 * expected.item(), rel=1e-5)
    assert out.logs["kl"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_is_zero_for_the_standard_normal_posterior():
    moments = torch.zeros(2, 6, 4, 4)  # mean 0, log-variance 0
    assert torch.equal(DiagonalGaussian(moments).kl(), torch.zeros(2))


def test_log_variance_is_clamped_to_minus_30_and_20():
    moments = torch.cat([torch.zeros(1, 2, 2, 2), torch.tensor([100.0, -100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1)
    post = DiagonalGaussian(moments)
    assert post.logvar[0, 0].max().item() == 20.0
    assert post.logvar[0, 1].min().item() == -30.0


def test_encoder_without_double_z_is_rejected_with_the_fix():
    encoder = Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=3, double_z=False)
    decoder = Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=3)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(encoder, decoder, embed_dim=3)


# -- VF loss terms --------------------------------------------------------------------------------
def test_marginal_cosine_equals_direct_computation_with_margin():
    torch.manual_seed(1)
    z, f = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    expected, n = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(3):
                cos = torch.dot(z[b, :, i, j], f[b, :, i, j]) / (z[b, :, i, j].norm() * f[b, :, i, j].norm())
                expected += max(0.0, 1 - 0.5 - cos.item())
                n += 1
    assert marginal_cosine_loss(z, f, margin=0.5).item() == pytest.approx(expected / n, rel=1e-5)


def test_marginal_cosine_is_zero_when_every_similarity_clears_the_margin():
    torch.manual_seed(2)
    f = torch.randn(2, 5, 3, 3)
    z = f + 0.3 * torch.randn_like(f)  # similar but not equal
    assert F.cosine_similarity(z, f, dim=1).min() > 0.5
    assert marginal_cosine_loss(z, f, margin=0.5).item() == 0.0
    assert marginal_cosine_loss(z, f, margin=0.0).item() > 0.0


def test_marginal_distance_matrix_equals_direct_computation_with_margin():
    torch.manual_seed(3)
    z, f = torch.randn(2, 4, 2, 3), torch.randn(2, 4, 2, 3)
    expected, count = 0.0, 0
    for b in range(2):
        zs = z[b].reshape(4, -1).t()  # (N, D) positions
        fs = f[b].reshape(4, -1).t()
        for i in range(6):
            for j in range(6):
                s_z = F.cosine_similarity(zs[i], zs[j], dim=0)
                s_f = F.cosine_similarity(fs[i], fs[j], dim=0)
                expected += max(0.0, abs(s_z - s_f).item() - 0.25)
                count += 1
    assert marginal_distance_matrix_loss(z, f, margin=0.25).item() == pytest.approx(expected / count, rel=1e-5)


def test_marginal_distance_matrix_is_zero_when_similarity_structure_matches_within_margin():
    torch.manual_seed(4)
    f = torch.randn(2, 4, 3, 3)
    z = 3.0 * f  # a per-position positive scale leaves every cosine similarity unchanged
    assert marginal_distance_matrix_loss(z, f, margin=0.0).item() == pytest.approx(0.0, abs=1e-6)
    z = f + 0.05 * torch.randn_like(f)
    assert marginal_distance_matrix_loss(z, f, margin=0.25).item() == 0.0
    assert marginal_distance_matrix_loss(z, f, margin=0.0).item() > 0.0


# -- VA-VAE --------------------------------------------------------------------------------------
def tiny_vavae(teacher_grid=(8, 8), teacher_dim=6, batch=2, **kwargs):
    torch.manual_seed(0)
    patches = torch.randn(batch, teacher_grid[0] * teacher_grid[1], teacher_dim)
    teacher = FixedTeacher(patches, teacher_grid)
    return VAVAE(*tiny_parts(), teacher=teacher, embed_dim=3, **kwargs), teacher


def test_vavae_returns_the_vf_loss_as_an_adaptive_term_on_the_encoder_last_layer():
    model, teacher = tiny_vavae(vf_weight=0.1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    term = out.adaptive["vf"]
    assert isinstance(term, AdaptiveTerm)
    assert term.param is model.encoder_last_layer()
    assert term.param is model.encoder.conv_out.weight
    assert term.weight == 0.1
    # the term equals the two margins' terms on the projected sampled latent
    f = teacher.patches.transpose(1, 2).reshape(2, 6, 8, 8)
    zp = model.vf_projection(out.latents)
    expected = marginal_cosine_loss(zp, f, 0.5) + marginal_distance_matrix_loss(zp, f, 0.25)
    assert term.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.logs["vf_mcos"].item() == pytest.approx(marginal_cosine_loss(zp, f, 0.5).item(), rel=1e-5)
    assert "vf" not in out.losses  # weighted by the loop, not here


def test_vavae_projection_is_a_bias_free_1x1_conv_to_the_teacher_width():
    model, _ = tiny_vavae(teacher_dim=6)
    assert model.vf_projection.kernel_size == (1, 1)
    assert model.vf_projection.bias is None
    assert (model.vf_projection.in_channels, model.vf_projection.out_channels) == (3, 6)


def test_teacher_features_are_resized_to_the_latent_grid():
    # teacher on a 4x4 grid, latent on 8x8: a per-channel constant map stays that constant
    const = torch.arange(6.0).view(1, 1, 6).expand(2, 16, 6).contiguous()
    model, _ = tiny_vavae(teacher_grid=(4, 4), teacher_dim=6)
    model.teacher.teacher.patches.copy_(const)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = model.teacher_features(x, (8, 8))
    assert feats.shape == (2, 6, 8, 8)
    assert torch.allclose(feats, torch.arange(6.0).view(1, 6, 1, 1).expand(2, 6, 8, 8), atol=1e-5)


def test_vavae_teacher_is_not_a_submodule():
    model, _ = tiny_vavae()
    assert not any(k.startswith("teacher") for k in model.state_dict())


def test_vavae_builds_from_a_random_teacher_spec():
    encoder, decoder = tiny_parts()
    model = VAVAE(encoder, decoder, teacher={"name": "dinov2_l", "weights": None, "random": True}, embed_dim=3)
    out = model(torch.rand(1, 3, 16, 16) * 2 - 1)
    assert torch.isfinite(out.adaptive["vf"].loss)
    assert model.vf_projection.out_channels == model.teacher.embed_dim


def test_adaptive_weight_equals_the_gradient_norm_ratio_computed_by_hand():
    from training.module import adaptive_weight

    # small model: y_hat = W x; nll = sum (W x - y)^2 -> grad 2 (W x - y) x^T;
    # loss = c * sum(W) -> grad c * ones
    torch.manual_seed(5)
    w = torch.randn(3, 4, requires_grad=True)
    x, y, c = torch.randn(4), torch.randn(3), 0.7
    nll = ((w @ x - y) ** 2).sum()
    loss = c * w.sum()
    grad_nll = 2 * torch.outer((w @ x - y).detach(), x)
    grad_loss = c * torch.ones(3, 4)
    expected = grad_nll.norm() / (grad_loss.norm() + 1e-4)
    got = adaptive_weight(nll, loss, w, max_weight=1e4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not got.requires_grad
    assert adaptive_weight(nll, loss, w, max_weight=0.01).item() == pytest.approx(0.01)


def test_vavae_rebuilds_without_loading_its_teacher_until_the_vf_loss_needs_it(monkeypatch):
    import tokenizers.teachers as teachers

    def refuse(spec):
        raise AssertionError("teacher weights loaded")

    monkeypatch.setattr(teachers, "get_teacher", refuse)
    encoder, decoder = tiny_parts()
    model = VAVAE(encoder, decoder, teacher={"name": "dinov2_l", "weights": "/missing.safetensors", "random": False},
                  embed_dim=3).eval()
    assert model.vf_projection.out_channels == 1024  # DINOv2 ViT-L width, from the architecture alone
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert model.decode(model.encode(x)).shape == x.shape


def test_vavae_feeds_the_teacher_raw_images_bilinearly_resized_as_the_reference():
    from tokenizers.teachers import build_random_teacher

    teacher = build_random_teacher("vavae_input_test", image_size=112)
    encoder, decoder = tiny_parts()
    model = VAVAE(encoder, decoder, teacher=teacher, embed_dim=3)
    x = torch.rand(2, 3, 160, 160) * 2 - 1  # shrunk to the teacher's size, as 256 -> 224
    grid = teacher.grid
    feats = model.teacher_features(x, grid)
    # LightningDiT foundation_models.py: interpolate(x, 224, bilinear), forward_features, [:, 1:]
    raw = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)
    expected = teacher.model.forward_features(raw)[:, 1:].transpose(1, 2).reshape(2, -1, *grid)
    assert torch.allclose(feats, expected, atol=1e-5)
    normalized = VAVAE(*tiny_parts(), teacher=teacher, embed_dim=3, teacher_input="normalized")
    assert not torch.allclose(normalized.teacher_features(x, grid), expected, atol=1e-3)
