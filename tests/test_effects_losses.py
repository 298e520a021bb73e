"""Every loss term reaches the parameters it should, and only those (gradients, not
values): codebook, commitment, entropy, KL, VF, disentanglement, semantic, flow, REPA,
the GAN's generator and discriminator terms, the regularisers. Each term is
back-propagated alone; "reaches" means a non-zero gradient, "does not reach" none."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inprocess import tiny_gan, tiny_vqgan
from tokenizers.quantizers import VectorQuantizer


def grad_norms(loss: torch.Tensor, named: dict[str, nn.Module | torch.Tensor]) -> dict[str, float]:
    """Total |gradient| of ``loss`` on each named module (all its parameters) or tensor."""
    targets = {k: ([v] if isinstance(v, torch.Tensor) else [p for p in v.parameters() if p.requires_grad])
               for k, v in named.items()}
    flat = [p for ps in targets.values() for p in ps]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    out, i = {}, 0
    for k, ps in targets.items():
        g = grads[i : i + len(ps)]
        out[k] = float(sum(x.abs().sum() for x in g if x is not None))
        i += len(ps)
    return out


def x_images(b=2, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- vector quantizer -------------------------------------------------------------------------
def test_codebook_term_moves_the_codes_and_commitment_moves_the_encoder_output():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=16, code_dim=4, beta=0.25, entropy_weight=0.1)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, _, losses, _ = vq(z)
    codebook = grad_norms(losses["codebook"], {"codes": vq.embedding.weight, "z": z})
    commitment = grad_norms(losses["commitment"], {"codes": vq.embedding.weight, "z": z})
    entropy = grad_norms(losses["entropy"], {"codes": vq.embedding.weight, "z": z})
    assert codebook["codes"] > 0 and codebook["z"] == 0
    assert commitment["z"] > 0 and commitment["codes"] == 0
    assert entropy["z"] > 0


def test_beta_scales_the_commitment_gradient_and_not_the_codebook_one():
    def grads(beta):
        torch.manual_seed(0)
        vq = VectorQuantizer(codebook_size=16, code_dim=4, beta=beta)
        z = torch.randn(2, 4, 3, 3, requires_grad=True)
        _, _, losses, _ = vq(z)
        return (torch.autograd.grad(losses["commitment"], z)[0],
                torch.autograd.grad(losses["codebook"], vq.embedding.weight)[0])

    commit_a, code_a = grads(0.25)
    commit_b, code_b = grads(1.0)
    torch.testing.assert_close(commit_b, 4 * commit_a)
    torch.testing.assert_close(code_b, code_a)


def test_entropy_temperature_and_weight_change_the_entropy_term():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3)

    def entropy(**kw):
        torch.manual_seed(1)
        return float(VectorQuantizer(16, 4, **kw)(z)[2]["entropy"])

    base = entropy(entropy_weight=0.1, entropy_temperature=0.01)
    assert entropy(entropy_weight=0.2, entropy_temperature=0.01) == pytest.approx(2 * base, rel=1e-6)
    assert entropy(entropy_weight=0.1, entropy_temperature=1.0) != pytest.approx(base, rel=1e-3)


def test_vqgan_decoder_loss_reaches_the_encoder_through_the_straight_through_codes():
    tok = tiny_vqgan()
    x = x_images()
    out = tok(x)
    reach = grad_norms(F.mse_loss(out.reconstruction, x), {"encoder": tok.encoder, "quant_conv": tok.quant_conv,
                                                           "codes": tok.quantizer.embedding.weight})
    assert reach["encoder"] > 0 and reach["quant_conv"] > 0
    assert reach["codes"] == 0  # codes learn from the codebook term only (straight-through)
    aux = grad_norms(sum(out.losses.values()), {"codes": tok.quantizer.embedding.weight, "encoder": tok.encoder})
    assert aux["codes"] > 0 and aux["encoder"] > 0


# -- KL and VF ----------------------------------------------------------------------------------
def test_kl_term_reaches_the_encoder_and_not_the_decoder():
    from test_vae import tiny_vae

    tok = tiny_vae(kl_weight=1.0)
    out = tok(x_images())
    reach = grad_norms(out.losses["kl"], {"encoder": tok.encoder, "quant_conv": tok.quant_conv,
                                          "decoder": tok.decoder})
    assert reach["encoder"] > 0 and reach["quant_conv"] > 0 and reach["decoder"] == 0


def test_vf_term_reaches_encoder_and_projection_through_the_loop_with_a_detached_weight():
    from test_vae import tiny_vavae
    from tokenizers.losses import ReconstructionLoss
    from training.module import TokenizerModule

    tok, _ = tiny_vavae(vf_weight=0.5)
    module = TokenizerModule(tok, ReconstructionLoss(perceptual_weight=0), None, ema_decay=None)
    x = x_images()
    out = tok(x)
    losses, logs = module.compute_losses(x, out, step=0, tokenizer=tok)
    w = logs["vf_adaptive_weight"]
    assert not w.requires_grad and w > 0
    torch.testing.assert_close(losses["vf"], w * 0.5 * out.adaptive["vf"].loss)
    reach = grad_norms(losses["vf"], {"encoder_out": tok.encoder.conv_out, "projection": tok.vf_projection,
                                      "decoder": tok.decoder})
    assert reach["encoder_out"] > 0 and reach["projection"] > 0 and reach["decoder"] == 0


@pytest.mark.parametrize("cos_margin,distmat_margin", [(0.0, 0.0), (0.3, 0.1), (0.9, 0.6)])
def test_vavae_margins_set_the_vf_loss(cos_margin, distmat_margin):
    """The margins given to the constructor (what the config sets) are the ones the loss
    uses: computed here by hand from the projected latent and the teacher features."""
    from test_vae import tiny_vavae

    tok, teacher = tiny_vavae(cos_margin=cos_margin, distmat_margin=distmat_margin)
    out = tok(x_images())
    projected = tok.vf_projection(out.latents)
    features = teacher.patches.transpose(1, 2).reshape(2, -1, 8, 8)
    cos = F.cosine_similarity(projected, features, dim=1)
    mcos = F.relu(1 - cos_margin - cos).mean()
    pz, pf = F.normalize(projected.flatten(2), dim=1), F.normalize(features.flatten(2), dim=1)
    mdms = F.relu((pz.transpose(1, 2) @ pz - pf.transpose(1, 2) @ pf).abs() - distmat_margin).mean()
    assert out.logs["vf_mcos"].item() == pytest.approx(mcos.item(), rel=1e-5, abs=1e-7)
    assert out.logs["vf_mdms"].item() == pytest.approx(mdms.item(), rel=1e-5, abs=1e-7)
    assert out.adaptive["vf"].loss.item() == pytest.approx((mcos + mdms).item(), rel=1e-5, abs=1e-7)


def test_vavae_margins_and_weights_from_the_config_reach_the_loss(tmp_path):
    from hydra.utils import instantiate

    from inprocess import compose_train

    def vf_logs(*overrides):
        cfg = compose_train(tmp_path, ["debug=smoke", "tokenizer=vavae", *overrides])
        torch.manual_seed(0)
        tok = instantiate(cfg.tokenizer)
        torch.manual_seed(1)
        out = tok(x_images(2, 32))
        return out.logs["vf_mcos"].item(), out.logs["vf_mdms"].item(), out.adaptive["vf"]

    mcos0, mdms0, _ = vf_logs("tokenizer.cos_margin=0.0", "tokenizer.distmat_margin=0.0")
    mcos1, mdms1, term = vf_logs("tokenizer.cos_margin=0.4", "tokenizer.distmat_margin=0.05",
                                 "tokenizer.vf_weight=0.7", "tokenizer.cos_weight=2.0", "tokenizer.distmat_weight=3.0")
    assert mcos1 < mcos0 and mdms1 < mdms0  # a margin forgives part of the misalignment
    assert term.weight == 0.7
    assert term.loss.item() == pytest.approx(2.0 * mcos1 + 3.0 * mdms1, rel=1e-5)


# -- FQGAN --------------------------------------------------------------------------------------
def test_disentanglement_term_reaches_every_branch():
    from test_fqgan import images, tiny_fqgan

    model = tiny_fqgan(k=3, disentangle_weight=0.1)
    out = model(images(2, 32))
    named = {name: branch.quant_conv for name, branch in model.branches.items()}
    named.update({f"{name}.adapter": branch.adapter for name, branch in model.branches.items()})
    named["decoder"] = model.decoder
    reach = grad_norms(out.losses["disentanglement"], named)
    assert all(reach[name] > 0 for name in named if name != "decoder"), reach
    assert reach["decoder"] == 0


def test_semantic_terms_reach_their_own_head_and_branch_only():
    from test_fqgan import images, tiny_fqgan

    model = tiny_fqgan(k=3)
    out = model(images(2, 32))
    b = model.branches
    reach = grad_norms(out.losses["semantic/dino"], {"dino.head": b["dino"].head, "dino.adapter": b["dino"].adapter,
                                                     "clip.head": b["clip"].head, "visual": b["visual"]})
    assert reach["dino.head"] > 0 and reach["dino.adapter"] > 0
    assert reach["clip.head"] == 0 and reach["visual"] == 0


def test_semantic_temperature_from_the_constructor_sets_the_loss():
    from test_fqgan import images, tiny_fqgan
    from tokenizers.fqgan import semantic_loss

    values = {}
    for t in (1.0, 0.1):
        model = tiny_fqgan(k=2, semantic_temperature=t)
        x = images(4, 32)
        out = model(x)
        z_q = model._quantize(x)[0][1]
        expected, _ = semantic_loss(model.branches["dino"].head(z_q), model.branches["dino"].teacher(x).cls, t)
        assert out.logs["semantic/dino"].item() == pytest.approx(expected.item(), rel=1e-5)
        values[t] = out.logs["semantic/dino"].item()
    assert values[1.0] != pytest.approx(values[0.1], rel=1e-3)


# -- FlexTok -------------------------------------------------------------------------------------
def _moved_flextok(**kw):
    from test_flextok import tiny_flextok

    torch.manual_seed(0)
    model = tiny_flextok(**kw)
    with torch.no_grad():  # move the zero-initialised output layers so every path carries gradient
        for p in [*model.decoder.final.parameters(), model.encoder.head.weight,
                  *(model.repa_projector.parameters() if model.repa_projector is not None else [])]:
            p.normal_(std=0.05)
        for block in model.decoder.blocks:
            for p in block.parameters():
                if p.dim() >= 1 and not p.abs().sum():
                    p.normal_(std=0.05)
    return model


def test_flow_term_reaches_encoder_and_decoder_and_repa_reaches_the_projector():
    from test_flextok import images

    model = _moved_flextok()
    out = model(images(4))
    flow = grad_norms(out.losses["flow"], {"encoder": model.encoder, "decoder_blocks": model.decoder.blocks,
                                           "projector": model.repa_projector})
    assert flow["encoder"] > 0 and flow["decoder_blocks"] > 0 and flow["projector"] == 0
    repa = grad_norms(out.losses["repa"], {"projector": model.repa_projector,
                                           "first_block": model.decoder.blocks[0],
                                           "last_block": model.decoder.blocks[-1]})
    assert repa["projector"] > 0 and repa["first_block"] > 0
    assert repa["last_block"] == 0  # repa_layer=1: features taken after the first block


def test_nested_dropout_is_applied_in_training_forward():
    """With nested dropout the mask token replaces the dropped registers, so it gets a
    gradient; without it (mode none, or eval) it never does."""
    from test_flextok import images

    def mask_grad(mode, train=True):
        model = _moved_flextok(nested_dropout=mode, cfg_dropout=0.0)
        model.train(train)
        torch.manual_seed(3)
        out = model(images(8))
        return grad_norms(out.losses["flow"], {"mask": model.decoder.mask_token})["mask"], out.logs["keep_mean"]

    grad, keep_mean = mask_grad("pow2")
    assert grad > 0 and float(keep_mean) < 8
    assert mask_grad("uniform")[0] > 0
    assert mask_grad("none")[0] == 0
    assert mask_grad("pow2", train=False)[0] == 0


def test_condition_dropout_uses_the_null_token_at_its_rate():
    from test_flextok import images

    def null_grad(rate):
        model = _moved_flextok(cfg_dropout=rate)
        torch.manual_seed(3)
        return grad_norms(model(images(4)).losses["flow"], {"null": model.decoder.null_token})["null"]

    assert null_grad(1.0) > 0 and null_grad(0.0) == 0


# -- GAN terms through the loop --------------------------------------------------------------------
def _module(gan, **kw):
    from tokenizers.losses import ReconstructionLoss
    from training.module import TokenizerModule

    return TokenizerModule(tiny_vqgan(), ReconstructionLoss(perceptual_weight=0), gan, ema_decay=None, **kw)


def test_generator_term_reaches_the_decoder_from_disc_start_on_and_not_before():
    module = _module(tiny_gan(disc_start=3))
    x = x_images()
    out = module.tokenizer(x)
    before, _ = module.compute_losses(x, out, step=2, tokenizer=module.tokenizer)
    assert "gan" not in before
    after, _ = module.compute_losses(x, out, step=3, tokenizer=module.tokenizer)
    reach = grad_norms(after["gan"], {"decoder": module.tokenizer.decoder, "codes": module.tokenizer.quantizer})
    assert reach["decoder"] > 0
    torch.testing.assert_close(after["gan"], 0.5 * module.gan.generator_loss(out.reconstruction, x))


def test_discriminator_term_reaches_the_discriminator_and_not_the_tokenizer():
    module = _module(tiny_gan())
    x = x_images()
    out = module.tokenizer(x)
    loss, _ = module.gan.discriminator_loss(x, out.reconstruction.detach())
    reach = grad_norms(loss, {"disc": module.gan.discriminator})
    assert reach["disc"] > 0
    loss2, _ = module.gan.discriminator_loss(x, out.reconstruction)
    assert grad_norms(loss2, {"tokenizer": module.tokenizer})["tokenizer"] == 0  # fake detached inside


class FixedLogits(nn.Module):
    """A 'discriminator' returning given logits for real (x > 0 mean) and fake inputs."""

    def __init__(self, real: float, fake: float):
        super().__init__()
        self.real, self.fake = real, fake
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        is_real = (x.flatten(1).mean(1) > 0).float().view(-1, 1, 1, 1)
        return self.scale * (is_real * self.real + (1 - is_real) * self.fake).expand(-1, 1, 2, 2)


@pytest.mark.parametrize("real,fake,expected", [(2.0, -2.0, 0.0), (-1.0, 1.0, 2.0), (0.5, 0.0, 0.5 * (0.5 + 1.0))])
def test_hinge_discriminator_loss_has_the_right_signs(real, fake, expected):
    from tokenizers.gan import PatchGANHinge

    gan = PatchGANHinge(FixedLogits(real, fake))
    real_x, fake_x = torch.ones(2, 3, 4, 4), -torch.ones(2, 3, 4, 4)
    loss, logs = gan.discriminator_loss(real_x, fake_x)
    assert loss.item() == pytest.approx(expected)
    assert logs["logits_real"].item() == pytest.approx(real) and logs["logits_fake"].item() == pytest.approx(fake)
    # the generator wants high fake logits: its loss is -mean D(fake)
    assert gan.generator_loss(fake_x, real_x).item() == pytest.approx(-fake)


def test_adaptive_gan_weight_is_the_clamped_gradient_ratio_of_the_configured_gan():
    from training.module import adaptive_weight

    for cap in (1e4, 1e-3):
        module = _module(tiny_gan(weighting="adaptive", disc_weight=0.8, max_adaptive_weight=cap))
        x = x_images()
        out = module.tokenizer(x)
        losses, logs = module.compute_losses(x, out, step=0, tokenizer=module.tokenizer)
        nll = module.loss.total(out.reconstruction, x)
        g = module.gan.generator_loss(out.reconstruction, x)
        expected = adaptive_weight(nll, g, module.tokenizer.decoder_last_layer(), cap)
        assert logs["gan_adaptive_weight"].item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(losses["gan"], expected * 0.8 * g)
        assert not logs["gan_adaptive_weight"].requires_grad
    assert logs["gan_adaptive_weight"].item() == pytest.approx(1e-3)  # the cap bites at 1e-3


# -- regularisers ------------------------------------------------------------------------------------
def test_regulariser_terms_reach_encoder_and_decoder_with_their_weight():
    from tokenizers.regularizers import EQVAE, ScaleEquivariance

    from test_vae import tiny_vae

    tok = tiny_vae()
    x = x_images()
    out = tok(x)
    for make in (lambda w: ScaleEquivariance(weight=w, factors=[2], min_image_size=4),
                 lambda w: EQVAE(weight=w, variant="additive", probability=1.0, modes=["rotate"], rotations=[1],
                               min_image_size=4)):
        (name, term), = make(1.0)(tok, x, out, F.l1_loss).items()
        (_, doubled), = make(2.0)(tok, x, out, F.l1_loss).items()
        torch.testing.assert_close(doubled, 2 * term)
        reach = grad_norms(term, {"encoder": tok.encoder, "decoder": tok.decoder})
        assert reach["encoder"] > 0 and reach["decoder"] > 0, name


# -- the generic reconstruction loss -----------------------------------------------------------------
class PerImageDistance(nn.Module):
    """Stand-in for LPIPS (same call: per-image distances), cheap and exact."""

    enabled = True

    def forward(self, x, y):
        return (x - y).pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("pixel", ["l1", "mse"])
def test_reconstruction_loss_uses_the_configured_distance_and_weights(pixel):
    from tokenizers.losses import ReconstructionLoss

    x, y = x_images(seed=0), x_images(seed=1)
    terms = ReconstructionLoss(pixel=pixel, pixel_weight=0.3, perceptual_weight=0.7, perceptual=PerImageDistance())(x, y)
    distance = (x - y).abs().mean() if pixel == "l1" else (x - y).pow(2).mean()
    torch.testing.assert_close(terms["pixel"], 0.3 * distance)
    torch.testing.assert_close(terms["perceptual"], 0.7 * (x - y).pow(2).flatten(1).sum(1).mean())
    assert "perceptual" not in ReconstructionLoss(pixel=pixel, perceptual_weight=0.0, perceptual=PerImageDistance())(x, y)
