"""Claims about FlexTok-FSQ (tokenizers/flextok.py, tokenizers/fsq.py), tiny widths on CPU."""
from __future__ import annotations

import copy
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from vector_quantize_pytorch import FSQ as ReferenceFSQ

from diffusion import flow
from tokenizers.flextok import (FlexTok, FlexTokEncoder, apply_nested_dropout, powers_of_two_up_to,
                                repa_alignment, resize_teacher_patches, sample_keep_counts)
from tokenizers.fsq import FSQ

LEVELS = [8, 8, 8, 5, 5, 5]


class FakeTeacher(nn.Module):
    """Frozen stand-in with the teacher interface: 12-wide features on a 4x4 grid."""

    embed_dim = 12

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, kernel_size=8, stride=8)
        self.requires_grad_(False)

    def forward(self, images):
        features = self.conv(images)
        return SimpleNamespace(patches=features.flatten(2).transpose(1, 2), grid=tuple(features.shape[-2:]))


def tiny_flextok(**overrides) -> FlexTok:
    kwargs = dict(allow_stand_in=True, stand_in_downsample=4, image_size=32, num_registers=8, encoder_width=32,
                  encoder_depth=1, decoder_width=32, decoder_depth=2, head_dim=16, teacher=FakeTeacher(),
                  repa_layer=1, repa_hidden=16, decode_steps=2)
    kwargs.update(overrides)
    return FlexTok(**kwargs)


def images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- FSQ ------------------------------------------------------------------------------------
def test_fsq_codes_and_indices_equal_vector_quantize_pytorch():
    z = 3 * torch.randn(64, 10, 6, generator=torch.Generator().manual_seed(0))
    codes, indices = FSQ(LEVELS)(z)
    ref_codes, ref_indices = ReferenceFSQ(LEVELS)(z)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(indices, ref_indices.long())


def test_fsq_has_64000_codes_and_decodes_every_index_to_its_code():
    fsq = FSQ(LEVELS)
    assert fsq.codebook_size == 64000
    every = torch.arange(64000)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(every)), every)
    assert torch.equal(fsq.indices_to_codes(every), ReferenceFSQ(LEVELS).indices_to_codes(every))


def test_fsq_runs_in_fp32_under_bf16_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, indices = FSQ(LEVELS)(torch.randn(4, 6, dtype=torch.bfloat16))
    assert codes.dtype == torch.float32 and indices.dtype == torch.int64


def test_fsq_passes_gradients_straight_through_the_rounding():
    z = torch.randn(5, 6, requires_grad=True)
    FSQ(LEVELS)(z)[0].sum().backward()
    assert (z.grad.abs() > 0).all()


# -- encoder mask ----------------------------------------------------------------------------
def encoder_and_tokens():
    torch.manual_seed(0)
    encoder = FlexTokEncoder(in_channels=48, patch_size=2, width=32, depth=2, head_dim=16, num_registers=6)
    tokens = encoder.input_tokens(torch.randn(2, 48, 4, 4))  # 4 patches + 6 registers
    return encoder, tokens, 4


@pytest.mark.parametrize("j", [0, 2, 5])
def test_changing_register_j_changes_no_encoder_output_before_j(j):
    encoder, tokens, n = encoder_and_tokens()
    changed = tokens.clone()
    changed[:, n + j] += torch.randn_like(changed[:, n + j])
    before, after = encoder.transformer(tokens, n), encoder.transformer(changed, n)
    assert torch.allclose(before[:, : n + j], after[:, : n + j], atol=1e-6)
    assert not torch.allclose(before[:, n + j], after[:, n + j], atol=1e-3)


def test_changing_a_register_changes_no_patch_output():
    encoder, tokens, n = encoder_and_tokens()
    changed = tokens.clone()
    changed[:, n:] = torch.randn_like(changed[:, n:])
    assert torch.allclose(encoder.transformer(tokens, n)[:, :n], encoder.transformer(changed, n)[:, :n], atol=1e-6)


def test_changing_a_patch_changes_every_register_output():
    encoder, tokens, n = encoder_and_tokens()
    changed = tokens.clone()
    changed[:, 0] += torch.randn_like(changed[:, 0])  # not a constant: LayerNorm would remove it
    diff = (encoder.transformer(tokens, n) - encoder.transformer(changed, n))[:, n:].abs().amax(dim=(0, 2))
    assert (diff > 1e-4).all()


# -- nested dropout ----------------------------------------------------------------------------
def test_nested_dropout_replaces_exactly_the_positions_from_k_on():
    tokens, mask_token = torch.randn(3, 8, 4), torch.full((4,), 7.0)
    keep = torch.tensor([1, 5, 8])
    out = apply_nested_dropout(tokens, keep, mask_token)
    for b, k in enumerate(keep.tolist()):
        assert torch.equal(out[b, :k], tokens[b, :k])
        assert (out[b, k:] == 7.0).all()


def test_pow2_keep_counts_are_uniform_over_powers_of_two():
    k = sample_keep_counts(20_000, 256, "pow2", generator=torch.Generator().manual_seed(0))
    values, counts = k.unique(return_counts=True)
    assert values.tolist() == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert (counts / 20_000 - 1 / 9).abs().max() < 0.02


def test_pow2_round_keep_counts_round_a_uniform_draw_up_to_a_power_of_two():
    k = sample_keep_counts(20_000, 256, "pow2_round", generator=torch.Generator().manual_seed(0))
    assert set(k.unique().tolist()) <= set(powers_of_two_up_to(256))
    assert (k == 256).float().mean().item() == pytest.approx(128 / 256, abs=0.02)  # 129..256 round to 256


def test_uniform_keep_counts_cover_one_to_r():
    k = sample_keep_counts(5_000, 16, "uniform", generator=torch.Generator().manual_seed(0))
    assert k.unique().tolist() == list(range(1, 17))


def test_unknown_nested_dropout_mode_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="pow2_round"):
        tiny_flextok(nested_dropout="halves")


# -- REPA --------------------------------------------------------------------------------------
def test_repa_alignment_is_zero_for_parallel_features_and_starts_at_one_from_zero_projection():
    target = torch.randn(2, 5, 12)
    loss, cosine = repa_alignment(3 * target, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and cosine.item() == pytest.approx(1.0, abs=1e-6)
    loss, _ = repa_alignment(torch.zeros(2, 5, 12), target)
    assert loss.item() == pytest.approx(1.0)


def test_repa_gradient_is_bounded_at_the_zero_initialised_projection():
    projected = torch.zeros(2, 5, 12, requires_grad=True)
    repa_alignment(projected, torch.randn(2, 5, 12))[0].backward()
    assert projected.grad.norm(dim=-1).max() <= 1.0 / 10 + 1e-6  # 1 / (B N) per token


def test_teacher_patches_are_resized_to_the_patch_grid():
    patches = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 3)
    assert resize_teacher_patches(patches, (4, 4), (2, 2)).shape == (1, 4, 3)
    assert torch.equal(resize_teacher_patches(patches, (4, 4), (4, 4)), patches)


def test_forward_returns_weighted_flow_and_repa_losses_and_no_reconstruction():
    model = tiny_flextok(repa_weight=0.25, flow_weight=2.0)
    out = model(images())
    assert out.reconstruction is None and out.latents is None
    assert set(out.losses) == {"flow", "repa"}
    assert out.losses["repa"].item() == pytest.approx(0.25)  # zero-initialised projector: 0.25 * (1 - 0)
    assert out.losses["flow"].item() == pytest.approx(2.0 * out.logs["flow_mse"].item())


def test_without_repa_no_teacher_is_needed():
    model = tiny_flextok(repa_weight=0.0, teacher=None)
    assert set(model(images()).losses) == {"flow"}


# -- training signal -------------------------------------------------------------------------
def test_every_parameter_gets_gradients_once_the_zero_initialised_layers_moved():
    torch.manual_seed(0)
    model = tiny_flextok()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = images(4)
    for _ in range(4):  # output head, then modulations / FSQ head, then the rest
        opt.zero_grad()
        sum(model(x).losses.values()).backward()
        opt.step()
    silent = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # the null token is used with probability cfg_dropout only, the mask token when k < R
    assert set(silent) <= {"decoder.null_token", "decoder.mask_token"}


def test_eval_forward_keeps_every_register_and_never_drops_the_condition():
    model = tiny_flextok().eval()
    assert model(images()).logs["keep_mean"].item() == model.num_registers


# -- decode ------------------------------------------------------------------------------------
def randomized(model: FlexTok) -> FlexTok:
    """Give the zero-initialised output layers weights so decoding depends on the tokens."""
    torch.manual_seed(1)
    for p in model.decoder.parameters():
        nn.init.normal_(p, std=0.05)
    return model.eval()


def test_decode_works_for_every_power_of_two_up_to_256_registers():
    model = randomized(tiny_flextok(num_registers=256, encoder_depth=1, decoder_depth=1, repa_weight=0.0,
                                    teacher=None))
    x = images(1)
    tokens = model.encode(x)
    assert tokens.shape == (1, 256) and tokens.dtype == torch.int64
    outputs = {k: model.decode(tokens, num_tokens=k, steps=1, noise=torch.zeros(1, 48, 8, 8))
               for k in powers_of_two_up_to(256)}
    for k, out in outputs.items():
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() <= 1.0
    assert not torch.equal(outputs[1], outputs[256])


def test_decode_from_a_prefix_equals_decode_of_all_tokens_truncated_to_k():
    model = randomized(tiny_flextok())
    tokens, noise = model.encode(images()), torch.randn(2, 48, 8, 8)
    prefix = model.decode(tokens[:, :3], steps=2, noise=noise)
    truncated = model.decode(tokens, num_tokens=3, steps=2, noise=noise)
    assert torch.allclose(prefix, truncated, atol=1e-6)


def test_decode_with_guidance_one_equals_the_conditional_euler_sampler():
    model = randomized(tiny_flextok())
    tokens, noise = model.encode(images()), torch.randn(2, 48, 8, 8)
    codes = model.fsq.indices_to_codes(tokens)
    keep, null = torch.full((2,), 8), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        latents = flow.euler_sample(lambda x, t: model.decoder(x, t, codes, keep, null)[0], noise, steps=3)
    expected = model.latents_to_images(latents)
    assert torch.allclose(model.decode(tokens, steps=3, guidance=1.0, noise=noise), expected, atol=1e-6)


def test_decode_with_guidance_differs_from_conditional_only_inside_the_interval():
    model = randomized(tiny_flextok())
    tokens, noise = model.encode(images()), torch.randn(2, 48, 8, 8)
    plain = model.decode(tokens, steps=3, guidance=1.0, noise=noise)
    guided = model.decode(tokens, steps=3, guidance=3.0, noise=noise)
    outside = model.decode(tokens, steps=3, guidance=3.0, guidance_interval=(2.0, 3.0), noise=noise)
    assert not torch.allclose(plain, guided, atol=1e-4)
    assert torch.equal(plain, outside)


def test_decode_rejects_more_tokens_than_given():
    model = tiny_flextok()
    with pytest.raises(ValueError, match="num_tokens"):
        model.decode(torch.zeros(1, 4, dtype=torch.long), num_tokens=5)


def test_reconstruct_at_returns_one_image_batch_per_token_count_up_to_r():
    model = tiny_flextok()
    recs = model.reconstruct_at(images(), token_counts=(1, 4, 16, 64, 256), steps=1)
    assert sorted(recs) == [1, 4]  # 8 registers
    assert all(r.shape == (2, 3, 32, 32) for r in recs.values())


# -- contract facts and plumbing -----------------------------------------------------------------
def test_token_facts_are_r_tokens_of_64000_codes():
    model = tiny_flextok()
    assert model.discrete and model.codebook_sizes == (64000,)
    assert model.token_shape(32) == (8,) and model.tokens_per_image(32) == 8
    assert model.bits_per_image(32) == pytest.approx(8 * math.log2(64000))


def test_latent_methods_explain_that_flextok_has_no_spatial_latent():
    model = tiny_flextok()
    with pytest.raises(NotImplementedError, match="regularizer=none"):
        model.encode_latents(images())


def test_vae_and_teacher_are_outside_the_state_dict_and_shared_by_deepcopy():
    model = tiny_flextok()
    assert not any(k.startswith(("codec", "teacher")) for k in model.state_dict())
    twin = copy.deepcopy(model)
    assert twin.codec is model.codec and twin.teacher is model.teacher


def test_missing_vae_checkpoint_names_the_config_key():
    with pytest.raises(ValueError, match="tokenizer.vae_ckpt"):
        tiny_flextok(allow_stand_in=False)


def test_stand_in_says_so_in_the_log(caplog):
    with caplog.at_level(logging.WARNING, logger="tokenizers.flextok"):
        tiny_flextok()
    assert "STAND-IN" in caplog.text


def test_a_tokenizer_vae_checkpoint_is_loaded_frozen_and_used(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    vae_config = {"_target_": "tokenizers.vae.AutoencoderKL",
                  "encoder": {"_target_": "tokenizers.conv.Encoder", "width": 16, "mults": [1, 2, 2],
                              "num_res_blocks": 1, "z_channels": 4, "double_z": True},
                  "decoder": {"_target_": "tokenizers.conv.Decoder", "width": 16, "mults": [1, 2, 2],
                              "num_res_blocks": 1, "z_channels": 4},
                  "embed_dim": 4}
    vae = instantiate(OmegaConf.create(vae_config))
    path = tmp_path / "vae.ckpt"
    torch.save({"config": {"tokenizer": vae_config},
                "state_dict": {f"tokenizer.{k}": v for k, v in vae.state_dict().items()}}, path)

    model = tiny_flextok(vae_ckpt=str(path), allow_stand_in=False)
    assert model.latent_channels == 4 and model.downsample == 4
    assert not model.codec.is_stand_in
    assert not any(p.requires_grad for p in model.codec.vae.parameters())
    x = images()
    raw = vae.eval().encode_latents(x)
    assert torch.isnan(model.latent_scale)  # latent_scale=None: measured on the first batch
    scaled = model.images_to_latents(x)
    assert torch.allclose(model.latent_scale, 1 / raw.std(), rtol=1e-4)
    assert torch.allclose(scaled, raw * model.latent_scale, atol=1e-5)
    assert torch.allclose(model.images_to_latents(images(seed=1)), vae.encode_latents(images(seed=1)) / raw.std(),
                          atol=1e-5)  # measured once, then fixed
    assert set(model(x).losses) == {"flow", "repa"}
    assert model.decode(model.encode(x), num_tokens=2, steps=1).shape == x.shape


def test_forward_under_bf16_autocast_keeps_the_fsq_input_and_the_losses_in_fp32():
    model = tiny_flextok()
    x0 = model.images_to_latents(images())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.encoder(x0).dtype == torch.float32
        out = model(images())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())


def test_a_decoder_narrower_than_a_patch_token_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="tokenizers.flextok"):
        tiny_flextok(patch_size=2, decoder_width=32)  # 48 channels x 2 x 2 = 192 values per token
    assert "decoder_width >= 192" in caplog.text


def test_shared_register_modulation_halves_the_decoder_adaln_sets():
    separate, shared = tiny_flextok(), tiny_flextok(separate_register_modulation=False)
    assert separate.decoder.blocks[0].modulation.groups == 2 and shared.decoder.blocks[0].modulation.groups == 1
    assert set(shared(images()).losses) == {"flow", "repa"}


def test_lazy_teacher_is_not_loaded_until_repa_needs_it():
    model = tiny_flextok(teacher={"name": "random", "random": True}, load_teachers=False)
    assert not model.teacher.loaded
    model.decode(model.encode(images()), num_tokens=2, steps=1)
    assert not model.teacher.loaded
    model(images())
    assert model.teacher.loaded


def test_register_tokens_follow_the_reference_order_and_null_conditions():
    """Position added to the embedded codes, then nested dropout (mask token, no position),
    then the null condition (learned token or zeros, no position) over every register."""
    for null_condition in ("learned", "zero"):
        model = randomized(tiny_flextok(null_condition=null_condition, repa_weight=0.0, teacher=None))
        dec = model.decoder
        codes = torch.rand(2, 8, 6) * 2 - 1
        keep, null = torch.tensor([3, 8]), torch.tensor([False, True])
        tokens = dec.register_tokens(codes, keep, null)
        embedded = dec.register_embed(codes[0]) + dec.register_pos
        assert torch.allclose(tokens[0, :3], embedded[:3])
        assert torch.equal(tokens[0, 3:], dec.mask_token.expand(5, -1))
        expected_null = dec.null_token if null_condition == "learned" else torch.zeros(dec.width)
        assert torch.equal(tokens[1], expected_null.expand(8, -1))
    assert tiny_flextok(null_condition="zero", repa_weight=0.0, teacher=None).decoder.null_token is None


def test_a_checkpoint_without_the_latent_scale_buffer_keeps_the_configured_scale():
    """FlexTok checkpoints from before latent_scale was saved load with the config's value."""
    old = tiny_flextok(latent_scale=0.5, repa_weight=0.0, teacher=None)
    state = {k: v for k, v in old.state_dict().items() if k != "latent_scale"}
    new = tiny_flextok(latent_scale=0.5, repa_weight=0.0, teacher=None)
    assert new.load_state_dict(state, strict=True) is not None
    assert float(new.latent_scale) == 0.5
