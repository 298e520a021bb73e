"""Claims about the autoregressive generator (diffusion/ar.py) and the latent sampler's
reference settings (diffusion/generator.py): causality, the factorized head's sub-token
order, CFG, the KV cache, FlexTok lengths, guided channels."""
import pytest
import torch

from diffusion import flow
from diffusion.ar import ClassConditionalAR, draw, filter_logits
from diffusion.generator import LatentDiT


def tiny_ar(vocab_sizes=(11,), positions=(3, 4), head_depth=0, **kw):
    torch.manual_seed(0)
    model = ClassConditionalAR(vocab_sizes, positions, num_classes=4, hidden=32, depth=2, heads=2,
                               head_depth=head_depth, class_dropout=0.0, **kw).eval()
    for p in model.parameters():  # leave the zero-initialised output so logits depend on the inputs
        torch.nn.init.normal_(p, std=0.3)
    return model


def random_tokens(model, batch=2):
    return torch.stack([torch.randint(v, (batch, model.length)) for v in model.vocab_sizes], dim=1)


@pytest.mark.parametrize("shape", [dict(positions=(3, 4)), dict(positions=(10,)),
                                   dict(vocab_sizes=(7, 5, 6), positions=(2, 3), head_depth=1)])
def test_logits_at_a_position_ignore_every_later_position(shape):
    model = tiny_ar(**shape)
    tokens, y = random_tokens(model), torch.tensor([1, 2])
    i = 3
    changed = tokens.clone()
    changed[:, :, i:] = random_tokens(model)[:, :, i:]
    before, after = model(tokens, y), model(changed, y)
    # position i's first sub-token sees positions < i only (later sub-tokens of position i
    # may see earlier ones of the same position: test_factorized_head_predicts_sub_tokens_in_order)
    assert torch.allclose(before[0][:, : i + 1], after[0][:, : i + 1], atol=1e-5)
    for a, b in zip(before, after):
        assert torch.allclose(a[:, :i], b[:, :i], atol=1e-5)
        assert not torch.allclose(a[:, i + 1:], b[:, i + 1:], atol=1e-3)  # later positions do see them


def test_factorized_head_predicts_sub_tokens_in_order():
    model = tiny_ar(vocab_sizes=(7, 5, 6), positions=(2, 3), head_depth=1)
    tokens, y, i = random_tokens(model), torch.tensor([0, 3]), 2
    base = model(tokens, y)
    for j in range(3):  # change sub-token j of position i only
        changed = tokens.clone()
        changed[:, j, i] = (changed[:, j, i] + 1) % model.vocab_sizes[j]
        out = model(changed, y)
        for m in range(3):
            same = torch.allclose(base[m][:, i], out[m][:, i], atol=1e-5)
            assert same == (m <= j), f"sub-token {m} {'saw' if same is False else 'ignored'} sub-token {j}"


def test_cfg_at_scale_one_samples_the_conditional_model():
    model = tiny_ar(vocab_sizes=(7, 5), positions=(2, 2), head_depth=1)
    y, u = torch.tensor([1, 3]), torch.rand(2, 4, 2)
    guided, guided_logits = model.generate(y, cfg_scale=1.0, uniforms=u, return_logits=True)
    # the conditional model alone, teacher-forced on what was sampled
    conditional = model(guided, y, drop_labels=False)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(guided_logits, conditional))
    null = model(guided, torch.full_like(y, model.null_class), drop_labels=False)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(conditional, null))  # the class matters


def test_cfg_logits_are_uncond_plus_scale_times_the_difference():
    model = tiny_ar(positions=(6,))
    y, u = torch.tensor([2]), torch.rand(1, 6, 1)
    tokens, logits = model.generate(y, cfg_scale=2.5, uniforms=u, return_logits=True)
    cond = model(tokens, y, drop_labels=False)[0]
    uncond = model(tokens, torch.full_like(y, model.null_class), drop_labels=False)[0]
    assert torch.allclose(logits[0], uncond + 2.5 * (cond - uncond), atol=1e-4)


@pytest.mark.parametrize("shape", [dict(positions=(3, 4)), dict(vocab_sizes=(7, 5, 6), positions=(2, 3), head_depth=1)])
def test_kv_cache_sampling_equals_full_recompute(shape):
    model = tiny_ar(**shape)
    y, u = torch.tensor([0, 1, 2]), torch.rand(3, model.length, model.num_codebooks)
    cached, cached_logits = model.generate(y, cfg_scale=2.0, uniforms=u, return_logits=True)
    full, full_logits = model.generate(y, cfg_scale=2.0, uniforms=u, return_logits=True, use_cache=False)
    assert torch.equal(cached, full)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(cached_logits, full_logits))


def test_a_sample_does_not_depend_on_its_batch():
    model = tiny_ar(positions=(8,))
    u = torch.rand(3, 8, 1)
    together = model.generate(torch.tensor([0, 1, 2]), cfg_scale=2.0, uniforms=u)
    alone = model.generate(torch.tensor([1]), cfg_scale=2.0, uniforms=u[1:2])
    assert torch.equal(together[1:2], alone)


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [[True, False, True, True]]
    u = torch.linspace(0, 0.999, 200)
    drawn = draw(logits.expand(200, -1), u, top_k=2)
    assert set(drawn.tolist()) == {0, 2}
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.02  # renormalised over the kept tokens


def test_flextok_generator_samples_exactly_k_tokens_the_tokenizer_decodes():
    from diffusion.samplers import contract_tokens
    from tokenizers.flextok import FlexTok

    torch.manual_seed(0)
    tokenizer = FlexTok(allow_stand_in=True, stand_in_downsample=4, image_size=16, patch_size=1, num_registers=8,
                        encoder_width=32, encoder_depth=1, decoder_width=64, decoder_depth=1, head_dim=16, fsq_levels=(8, 5, 5),
                        repa_weight=0.0, decode_steps=2, latent_scale=1.0).eval()
    model = tiny_ar(vocab_sizes=tokenizer.codebook_sizes, positions=tokenizer.token_shape(16))
    for k in (1, 3, 8):
        tokens = model.generate(torch.tensor([0, 1]), num_positions=k, cfg_scale=2.0)
        assert tokens.shape == (2, 1, k) and int(tokens.max()) < tokenizer.codebook_sizes[0]
        sequence = contract_tokens(tokens, tokenizer.token_shape(16))
        assert sequence.shape == (2, k)
        images = tokenizer.decode(sequence, num_tokens=k)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="num_positions"):
        model.generate(torch.tensor([0]), num_positions=9)


def test_several_codebooks_without_the_factorized_head_are_refused():
    with pytest.raises(ValueError, match="head_depth"):
        ClassConditionalAR((5, 5), (2, 2), num_classes=3, hidden=32, depth=1, heads=2, head_depth=0)


def test_latent_sampler_guides_only_the_chosen_channels():
    torch.manual_seed(0)
    model = LatentDiT(in_channels=4, input_size=4, patch_size=1, hidden=32, depth=1, heads=2, num_classes=3,
                      class_dropout=0.0).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    y, noise = torch.tensor([1, 2]), torch.randn(2, 4, 4, 4)
    partial = model.sample(y, steps=1, guidance=4.0, guided_channels=3, noise=noise)
    full = model.sample(y, steps=1, guidance=4.0, noise=noise)
    one_step = model.sample(y, steps=1, guidance=1.0, noise=noise)
    assert torch.allclose(partial[:, 3:], one_step[:, 3:], atol=1e-6)  # channel 3 follows the conditional model
    assert torch.allclose(partial[:, :3], full[:, :3], atol=1e-6)
    assert not torch.allclose(partial[:, :3], one_step[:, :3], atol=1e-4)


def test_lightningdit_shift_in_this_convention_is_the_inverse_shift():
    # LightningDiT: its t (0 noise, 1 data) shifted by s; ours tau = 1 - t shifted by 1/s
    s = 0.3
    their_t = torch.linspace(0, 1, 250)
    theirs = s * their_t / (1 + (s - 1) * their_t)
    ours = flow.sampling_times(249, shift=1 / s)
    assert torch.allclose(ours, 1 - theirs, atol=1e-5)
