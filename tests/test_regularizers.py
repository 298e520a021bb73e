"""Latent-space regularisers: transforms, EQ-VAE target alignment, scale equivariance."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers.contract import Tokenizer, TokenizerOutput
from tokenizers.conv import Decoder, Encoder
from tokenizers.regularizers import EQVAE, LatentTransform, ScaleEquivariance, rotate90, scale
from tokenizers.vae import AutoencoderKL


class ToyTokenizer(Tokenizer):
    """Latents = images (downsample 1); the decoder is a pointwise 1x1 conv, optionally
    after a nearest x``up`` upsampling: both commute with 90-degree rotations."""

    discrete = False

    def __init__(self, up: int = 1, identity: bool = True, channels: int = 3):
        super().__init__()
        self.up = up
        self.mix = nn.Conv2d(channels, 3, 1)
        if identity:
            with torch.no_grad():
                self.mix.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
                self.mix.bias.zero_()

    def encode_latents(self, images):
        return images

    def decode_latents(self, latents):
        if self.up > 1:
            latents = F.interpolate(latents, scale_factor=self.up, mode="nearest")
        return self.mix(latents)

    def forward(self, images):
        z = self.encode_latents(images)
        return TokenizerOutput(self.decode_latents(z), latents=z)


class SpyLoss:
    """Reconstruction loss that records what it compared."""

    def __init__(self):
        self.calls = []

    def __call__(self, recon, target):
        self.calls.append((recon.detach().clone(), target.detach().clone()))
        return F.mse_loss(recon, target)


# -- transforms ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotating_the_latent_then_decoding_equals_decoding_then_rotating(k):
    torch.manual_seed(0)
    decoder = ToyTokenizer(up=2, identity=False, channels=4)
    z = torch.randn(2, 4, 3, 5)  # non-square: rotation swaps H and W
    assert torch.allclose(decoder.decode_latents(rotate90(z, k)), rotate90(decoder.decode_latents(z), k), atol=1e-6)


def test_rotate90_four_times_is_the_identity_and_one_turn_moves_a_corner():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.equal(rotate90(rotate90(rotate90(rotate90(x, 1), 1), 1), 1), x)
    assert rotate90(x, 1).shape == (1, 1, 3, 2)
    assert rotate90(x, 1)[0, 0, -1, 0] == x[0, 0, 0, 0]  # top-left goes to bottom-left (counter-clockwise)


def test_scale_by_half_of_a_constant_map_is_the_constant():
    x = torch.full((1, 2, 8, 8), 0.3)
    assert torch.allclose(scale(x, (4, 4)), torch.full((1, 2, 4, 4), 0.3), atol=1e-6)


def test_scale_down_by_two_without_antialias_is_2x2_average_pooling():
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(scale(x, 4, antialias=False), F.avg_pool2d(x, 2), atol=1e-6)


# -- EQ-VAE -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "transform",
    [LatentTransform(None, 1), LatentTransform(0.5, 0), LatentTransform(0.6, 3), LatentTransform(0.97, 2)],
)
def test_eq_vae_target_gets_the_same_transform_as_the_latent(transform):
    # identity tokenizer: Dec(T z) == T x exactly when the image transform matches the latent one
    tok = ToyTokenizer()
    x = torch.rand(2, 3, 12, 12) * 2 - 1
    spy = SpyLoss()
    loss = EQVAE().transformed_loss(tok, x, tok.encode_latents(x), spy, transform)
    recon, target = spy.calls[0]
    assert recon.shape == target.shape
    assert torch.allclose(recon, target, atol=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_eq_vae_rotation_target_is_the_rotated_image_for_a_downsampling_tokenizer():
    tok = ToyTokenizer(up=2, identity=False)
    z = torch.randn(1, 3, 4, 6)
    x = tok.decode_latents(z).detach()  # a perfect reconstruction at downsample 2
    spy = SpyLoss()
    EQVAE().transformed_loss(tok, x, z, spy, LatentTransform(None, 1))
    recon, target = spy.calls[0]
    assert torch.equal(target, rotate90(x, 1))
    assert torch.allclose(recon, target, atol=1e-6)


def test_eq_vae_scaled_target_has_the_decoded_size():
    tok = ToyTokenizer(up=4)
    z = torch.randn(1, 3, 8, 8)
    x = torch.randn(1, 3, 32, 32)
    spy = SpyLoss()
    EQVAE().transformed_loss(tok, x, z, spy, LatentTransform(0.5, 1))
    recon, target = spy.calls[0]
    assert recon.shape == target.shape == (1, 3, 16, 16)


def test_eq_vae_sampled_transforms_stay_in_the_configured_ranges():
    reg = EQVAE(scale_range=(0.25, 0.97), rotations=(1, 2, 3), scale_step=None,
                modes=("scale", "rotate", "scale_rotate"))
    for _ in range(200):
        t = reg.sample_transform()
        assert t.scale_factor is not None or t.k != 0
        assert t.scale_factor is None or 0.25 <= t.scale_factor <= 0.97
        assert t.k in (0, 1, 2, 3)


def test_eq_vae_adds_its_weighted_term_only_on_transformed_steps():
    tok = ToyTokenizer(identity=False)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    out = tok(x)
    assert EQVAE(variant="additive", probability=0.0)(tok, x, out, F.mse_loss) == {}
    term = EQVAE(variant="additive", probability=1.0, weight=0.5, modes=("rotate",))(tok, x, out, F.mse_loss)
    assert set(term) == {"eq_vae"}
    assert term["eq_vae"].requires_grad


# -- scale equivariance ------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 4])
def test_scale_equivariance_compares_decoded_downsampled_latent_with_downsampled_image(factor):
    tok = ToyTokenizer(up=2, identity=False)
    z = torch.randn(2, 3, 8, 8)
    x = torch.randn(2, 3, 16, 16)
    out = TokenizerOutput(tok.decode_latents(z), latents=z)
    spy = SpyLoss()
    reg = ScaleEquivariance(weight=0.25, factors=[factor], min_image_size=1)
    term = reg(tok, x, out, spy)
    recon, target = spy.calls[0]
    assert torch.allclose(recon, tok.decode_latents(scale(z, 8 // factor)))
    assert torch.allclose(target, scale(x, 16 // factor))
    assert term["scale_equivariance"].item() == pytest.approx(0.25 * F.mse_loss(recon, target).item(), rel=1e-5)


def test_scale_equivariance_is_zero_for_an_identity_tokenizer():
    tok = ToyTokenizer()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    term = ScaleEquivariance(factors=[2, 4], min_image_size=1)(tok, x, tok(x), F.mse_loss)
    assert term["scale_equivariance"].item() == pytest.approx(0.0, abs=1e-10)


def test_scale_equivariance_rejects_a_latent_grid_smaller_than_the_factor():
    tok = ToyTokenizer()
    x = torch.rand(1, 3, 2, 2)
    with pytest.raises(ValueError, match="factors"):
        ScaleEquivariance(factors=[4], min_image_size=1)(tok, x, tok(x), F.mse_loss)


def test_scale_equivariance_skips_factors_that_leave_images_below_min_size():
    reg = ScaleEquivariance(factors=[2, 4], min_image_size=16)
    assert reg.usable_factors((8, 8), (64, 64)) == (2, 4)
    assert reg.usable_factors((8, 8), (32, 32)) == (2,)
    with pytest.raises(ValueError, match="min_image_size"):
        reg.usable_factors((8, 8), (16, 16))


def test_eq_vae_raises_small_scales_to_keep_min_image_size():
    reg = EQVAE(scale_range=(0.25, 0.25), modes=("scale",), min_image_size=16)
    t = reg.sample_transform((8, 8), (32, 32))  # 4 px per token: >= 4 tokens needed
    assert t.scale_factor == pytest.approx(0.5)
    assert t.latent_size(8, 8) == (4, 4)
    t = reg.sample_transform((8, 8), (128, 128))
    assert t.scale_factor == pytest.approx(0.25)


def test_regularizers_reject_non_spatial_latents_with_the_fix():
    tok = ToyTokenizer()
    out = TokenizerOutput(None, latents=torch.randn(2, 16, 6))  # 1D tokens, e.g. FlexTok registers
    with pytest.raises(TypeError, match="regularizer=none"):
        ScaleEquivariance()(tok, torch.randn(2, 3, 8, 8), out, F.mse_loss)


def tiny_vae():
    return AutoencoderKL(
        Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=4, double_z=True),
        Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=4),
        embed_dim=4,
    )


def tiny_vqgan():
    from tokenizers.quantizers import VectorQuantizer
    from tokenizers.vqgan import VQGAN

    return VQGAN(
        Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=4),
        Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=4),
        VectorQuantizer(codebook_size=16, code_dim=4),
    )


@pytest.mark.parametrize("build", [tiny_vae, tiny_vqgan], ids=["vae", "vqgan"])
def test_regularizers_train_the_decoder_through_the_contract(build):
    torch.manual_seed(0)
    tok = build()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = tok(x)
    for reg in (ScaleEquivariance(factors=[2, 4], min_image_size=4),
                EQVAE(variant="additive", probability=1.0, min_image_size=4)):
        (loss,) = reg(tok, x, out, F.l1_loss).values()
        grad = torch.autograd.grad(loss, tok.decoder_last_layer(), retain_graph=True)[0]
        assert grad.abs().sum() > 0


# -- EQ-VAE, the paper's variant: the whole step on the transformed pair ------------------------
def test_eq_vae_paper_scales_come_from_the_k_over_32_grid_with_a_rotation_every_time():
    reg = EQVAE()  # the paper's defaults
    seen = set()
    for _ in range(400):
        t = reg.sample_transform((16, 16), (256, 256))
        assert t.k in (1, 2, 3)
        k32 = t.scale_factor * 32
        assert k32 == pytest.approx(round(k32)) and 8 <= round(k32) <= 31
        seen.add(round(k32))
    assert seen == set(range(8, 32))


def test_eq_vae_paper_step_compares_the_decoded_transformed_latent_with_the_transformed_image():
    torch.manual_seed(0)
    vae = tiny_vae()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    transform = LatentTransform(0.5, 1)
    torch.manual_seed(1)
    target, out = EQVAE().transformed_pair(vae, x, transform)
    torch.manual_seed(1)
    z = vae(x).latents  # the same posterior sample
    assert torch.allclose(out.latents, rotate90(scale(z, (4, 4), antialias=False), 1))
    assert torch.allclose(out.reconstruction, vae.decode_latents(out.latents), atol=1e-6)
    assert out.reconstruction.shape == target.shape == (2, 3, 8, 8)
    assert torch.allclose(target, rotate90(scale(x, (8, 8), antialias=False), 1))
    assert set(out.losses) == {"kl"}  # the step's other losses come along


def test_eq_vae_paper_step_reaches_the_encoder_through_the_transformed_latent():
    torch.manual_seed(0)
    vae = tiny_vae()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    target, out = EQVAE().transformed_pair(vae, x, LatentTransform(0.5, 2))
    loss = F.l1_loss(out.reconstruction, target)  # no KL: the path through Dec(T z) alone
    grad = torch.autograd.grad(loss, vae.encoder.conv_in.weight)[0]
    assert grad.abs().sum() > 0


def test_eq_vae_paper_branches_follow_their_probabilities():
    torch.manual_seed(0)
    vae = tiny_vae()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    # only the low-resolution prior branch: the plain step on a downscaled image
    reg = EQVAE(probability=0.0, low_res_probability=1.0, scale_range=(0.5, 0.5), min_image_size=4)
    target, out = reg.training_pair(vae, x)
    assert target.shape == out.reconstruction.shape == (1, 3, 16, 16)
    assert target.shape[-1] % 2 == 0  # a multiple of the downsampling factor
    assert torch.allclose(target, scale(x, target.shape[-2:], antialias=False))
    # neither branch: the plain step
    assert EQVAE(probability=0.0, low_res_probability=0.0).training_pair(vae, x) is None
    # the additive variant never replaces the step
    assert EQVAE(variant="additive", probability=1.0).training_pair(vae, x) is None


def test_eq_vae_paper_adds_no_term_the_step_is_the_objective():
    vae = tiny_vae()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert EQVAE(probability=1.0)(vae, x, vae(x), F.l1_loss) == {}


def test_eq_vae_paper_step_goes_through_the_loop_and_its_discriminator():
    from tokenizers.gan import NLayerDiscriminator, PatchGANHinge
    from tokenizers.losses import ReconstructionLoss
    from training.module import TokenizerModule

    class SpyGAN(PatchGANHinge):
        seen: list = []

        def discriminator_loss(self, real, fake, step=None):
            self.seen.append((real.shape, fake.shape))
            return super().discriminator_loss(real, fake, step)

    torch.manual_seed(0)
    random.seed(0)
    vae = tiny_vae()
    gan = SpyGAN(NLayerDiscriminator(ndf=4, n_layers=1), disc_start=0)
    # the 1-layer PatchGAN needs >= 8 px images
    module = TokenizerModule(vae, ReconstructionLoss(pixel="l1", perceptual_weight=0), gan,
                             regularizer=EQVAE(probability=1.0, min_image_size=8), ema_decay=None)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    target, out = module.training_pair(x)
    assert target.shape[-1] < 16 and out.reconstruction.shape == target.shape
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(torch.rand(4, 3, 16, 16) * 2 - 1, torch.zeros(4)), batch_size=2))
    assert len(SpyGAN.seen) == 2
    assert all(real == fake and real[-1] < 16 for real, fake in SpyGAN.seen)  # transformed pairs
