"""Claims about diffusion/: shared transformer blocks, rectified-flow utilities, LatentDiT."""
from __future__ import annotations

import pytest
import torch

from diffusion import flow
from diffusion.blocks import (Attention, Block, FinalLayer, Rope2D, apply_rope, modulate, patchify,
                              prefix_causal_mask, sincos_2d, unpatchify)
from diffusion.generator import LatentDiT


# -- blocks ---------------------------------------------------------------------------
def test_prefix_causal_mask_is_built_once_per_shape():
    assert prefix_causal_mask(4, 3, "cpu") is prefix_causal_mask(4, 3, "cpu")
    assert prefix_causal_mask(4, 3, "cpu") is not prefix_causal_mask(4, 5, "cpu")


def test_prefix_causal_mask_lets_prefix_see_prefix_and_causal_see_prefix_and_earlier():
    mask = prefix_causal_mask(2, 3, "cpu")
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    block = Block(32, 4, cond_dim=16)
    x, cond = torch.randn(2, 5, 32), torch.randn(2, 16)
    assert torch.equal(block(x, cond=cond), x)


def test_adaln_zero_block_with_segments_is_identity_at_init():
    block = Block(32, 4, cond_dim=16, adaln_groups=2)
    x, cond = torch.randn(2, 5, 32), torch.randn(2, 16)
    assert torch.equal(block(x, cond=cond, segments=(3, 2)), x)


def test_segment_modulation_applies_each_set_to_its_own_tokens():
    x = torch.ones(1, 5, 2)
    shift = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])  # (B, groups=2, D)
    out = modulate(x, shift, torch.zeros_like(shift), sizes=(3, 2))
    assert torch.equal(out[0, :, 0], torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0]))


def test_segment_modulation_rejects_sizes_that_do_not_cover_the_tokens():
    shift = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="segment sizes"):
        modulate(torch.ones(1, 5, 2), shift, shift, sizes=(3, 1))


def test_final_layer_outputs_zero_at_init():
    layer = FinalLayer(32, 12, cond_dim=16)
    assert torch.count_nonzero(layer(torch.randn(2, 5, 32), torch.randn(2, 16))) == 0


def test_attention_mask_blocks_information_flow():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    mask = prefix_causal_mask(3, 2, "cpu")
    x = torch.randn(1, 5, 16)
    changed = x.clone()
    changed[:, 4] += 1.0  # the last causal token: nobody else may see it
    assert torch.allclose(attn(x, mask=mask)[:, :4], attn(changed, mask=mask)[:, :4], atol=1e-6)


def test_rope_preserves_norm_and_leaves_tokens_after_the_grid_unrotated():
    cos, sin = Rope2D(8)(2, 2)
    x = torch.randn(1, 2, 6, 8)  # 4 grid tokens + 2 extra
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.equal(out[..., 4:, :], x[..., 4:, :])
    assert torch.equal(out[..., 0, :], x[..., 0, :])  # position (0, 0) has angle zero


def test_rope_makes_attention_scores_depend_on_relative_position_only():
    rope = Rope2D(8)
    cos, sin = rope(3, 3)
    q, k = torch.randn(8), torch.randn(8)
    rotated_q = apply_rope(q.expand(1, 1, 9, 8), cos, sin)[0, 0]
    rotated_k = apply_rope(k.expand(1, 1, 9, 8), cos, sin)[0, 0]
    # (0,0)->(1,1) and (1,1)->(2,2) are the same offset: tokens 0->4 and 4->8
    assert torch.dot(rotated_q[0], rotated_k[4]) == pytest.approx(float(torch.dot(rotated_q[4], rotated_k[8])), abs=1e-5)


def test_sincos_2d_has_distinct_rows_per_position():
    emb = sincos_2d(16, 3, 4)
    assert emb.shape == (12, 16)
    assert torch.cdist(emb, emb).add(torch.eye(12)).min() > 1e-3


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 8, 4)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 3, 8, 4), x)


# -- flow -----------------------------------------------------------------------------
def test_interpolation_is_data_at_t0_and_noise_at_t1():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(2)), eps)


def test_velocity_target_is_the_time_derivative_of_the_interpolation():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    t, dt = torch.full((2,), 0.3), 1e-3
    finite_difference = (flow.interpolate(x0, eps, t + dt) - flow.interpolate(x0, eps, t)) / dt
    assert torch.allclose(finite_difference, flow.velocity_target(x0, eps), atol=1e-3)


def test_logit_normal_time_lies_strictly_inside_the_unit_interval():
    t = flow.sample_time(10_000, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sampler_integrates_a_constant_velocity_field_exactly(shift):
    x0, eps = torch.randn(2, 4), torch.randn(2, 4)
    constant = flow.velocity_target(x0, eps)
    out = flow.euler_sample(lambda x, t: constant, eps, steps=7, shift=shift)
    assert torch.allclose(out, x0, atol=1e-5)


def test_time_shift_keeps_endpoints_and_moves_midpoint_towards_noise():
    times = flow.sampling_times(4, shift=3.0)
    assert times[0] == 1.0 and times[-1] == 0.0
    assert times[2] > 0.5


def test_guidance_scale_one_equals_the_conditional_prediction():
    cond, uncond = torch.randn(3), torch.randn(3)
    assert torch.equal(flow.guide(cond, uncond, 1.0), cond)
    assert torch.allclose(flow.guide(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))


def test_guidance_applies_only_inside_the_interval():
    seen = []

    def uncond(x, t):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    flow.euler_sample(lambda x, t: torch.ones_like(x), torch.zeros(1, 2), steps=4, guidance=2.0,
                      uncond_velocity=uncond, guidance_interval=(0.0, 0.6))
    assert seen == [0.5, 0.25]  # times 1.0 and 0.75 are outside the interval


# -- generator ------------------------------------------------------------------------
def tiny_dit(**overrides):
    kwargs = dict(in_channels=4, input_size=8, patch_size=2, hidden=32, depth=2, heads=4, num_classes=5)
    kwargs.update(overrides)
    return LatentDiT(**kwargs)


def test_latent_dit_predicts_zero_velocity_at_init():
    model = tiny_dit()
    v = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3]))
    assert v.shape == (2, 4, 8, 8) and torch.count_nonzero(v) == 0


def test_latent_dit_gets_gradients_everywhere_once_the_zero_init_layers_moved():
    torch.manual_seed(0)
    model = tiny_dit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.rand(2)
    y = torch.tensor([1, 2])
    # step 1 moves only the zero-initialised output layer, step 2 the adaLN modulations,
    # from step 3 on every parameter gets a gradient
    for _ in range(3):
        opt.zero_grad()
        flow.flow_loss(model(flow.interpolate(x0, eps, t), t, y), flow.velocity_target(x0, eps)).backward()
        opt.step()
    missing = [name for name, p in model.named_parameters()
               if name != "y_embed.weight" and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_latent_dit_sample_with_guidance_one_equals_conditional_euler():
    torch.manual_seed(0)
    model = tiny_dit(class_dropout=0.0).eval()
    for p in model.parameters():  # leave the zero init so the output depends on the label
        torch.nn.init.normal_(p, std=0.05)
    y, noise = torch.tensor([1, 4]), torch.randn(2, 4, 8, 8)
    sampled = model.sample(y, steps=3, guidance=1.0, noise=noise)
    reference = flow.euler_sample(lambda x, t: model(x, t, y), noise, steps=3)
    assert torch.allclose(sampled, reference, atol=1e-6)


def test_latent_dit_rejects_wrong_latent_shape():
    with pytest.raises(ValueError, match="expects latents"):
        tiny_dit()(torch.randn(1, 3, 8, 8), torch.rand(1), torch.tensor([0]))
