"""FlexTok: the project's model, loaded from a release-format directory, computes what
Apple's reference code (github.com/apple/ml-flextok) computes.

The fixture (``tests/fixtures/parity/flextok/``, made by ``scripts/parity/flextok_fixtures.py``
from a local clone of the reference) is a reduced-width FlexTok with random weights in the
release's layout (``model/``: config.json + model.safetensors as the hub mixin writes them;
``vae/``: a diffusers AutoencoderKL directory), and what the reference returned for two
images: VAE latents, token ids, and images decoded from the first k tokens from a given
initial noise at the reference's decode settings (20 steps, guidance 7.5, APG). fp32, CPU.

Also here: the method settings taken from the reference (issue 10, item 5): norm-guided CFG
and the decode defaults, the latent scale from the VAE, seeded decode noise.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion import flow
from helpers import ROOT
from tokenizers.pretrained import MissingReleaseError, StateDictMismatch, load_pretrained
from tokenizers.pretrained.flextok import UnsupportedConfig

FIXTURE = ROOT / "tests/fixtures/parity/flextok"


@pytest.fixture(scope="module")
def single_thread():
    # the tiny transformer is dominated by thread hand-offs on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def released(single_thread):
    return load_pretrained("flextok_d12_d12", FIXTURE / "model", vae=FIXTURE / "vae", image_size=64)


# -- parity ----------------------------------------------------------------------------------
def test_vae_latents_and_tokens_equal_the_reference(released, expected):
    """The diffusers VAE converted to the project's AutoencoderKL, times its scaling_factor,
    and the encoder + FSQ: every token id equal."""
    latents = released.images_to_latents(expected["images"])
    assert float(released.latent_scale) == pytest.approx(0.8)  # the VAE's scaling_factor, not 1
    torch.testing.assert_close(latents, expected["latents"], atol=1e-5, rtol=0)
    tokens = released.encode(expected["images"])
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, expected["tokens"])


@pytest.mark.parametrize("k", [1, 5, 32])
def test_decoded_images_equal_the_reference_at_its_decode_settings(released, expected, k):
    """Default decode (20 Euler steps, guidance 7.5, APG) of the first k tokens from the same
    initial noise: within 1e-3 of the reference's images."""
    assert (released.decode_steps, released.decode_guidance, released.decode_guidance_method) == (20, 7.5, "apg")
    images = released.decode(expected["tokens"][:, :k], noise=expected["noise"])
    reference = expected[f"apg_k{k}"].clamp(-1, 1)
    assert reference.abs().lt(1).float().mean() > 0.99  # the comparison is not on saturated pixels
    assert (images - reference).abs().max() <= 1e-3


def test_plain_cfg_decode_equals_the_reference(released, expected):
    images = released.decode(expected["tokens"][:, :5], noise=expected["noise"], guidance_method="cfg")
    assert (images - expected["cfg_k5"].clamp(-1, 1)).abs().max() <= 1e-3
    # APG and CFG differ at this guidance: the APG comparison above is not passing by accident
    assert (expected["apg_k5"] - expected["cfg_k5"]).abs().max() > 1e-2


# -- the loader ----------------------------------------------------------------------------------
def test_missing_vae_names_the_option_and_where_it_is_published(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MissingReleaseError, match=r"(?s)flextok_vae_c16.*vae="):
        load_pretrained("flextok_d12_d12", FIXTURE / "model", vae=tmp_path / "nowhere")


def _copy_model(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(FIXTURE / "model", model)
    return model


def test_a_config_the_project_does_not_implement_is_refused_by_name(tmp_path):
    model = _copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["decoder"]["module_dict"]["dec_latent_dropout"]["replace_with_single_token"] = True
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfig, match="replace_with_single_token"):
        load_pretrained("flextok_d12_d12", model, vae=FIXTURE / "vae")


def test_a_tensor_without_a_place_in_the_model_is_reported(tmp_path):
    model = _copy_model(tmp_path)
    state = load_file(str(model / "model.safetensors"))
    state["decoder.module_dict.dec_repa_projector.weight"] = torch.zeros(2, 2)
    save_file(state, str(model / "model.safetensors"))
    with pytest.raises(StateDictMismatch, match="dec_repa_projector"):
        load_pretrained("flextok_d12_d12", model, vae=FIXTURE / "vae")


def test_a_depth_that_does_not_match_the_weights_lists_the_missing_tensors(tmp_path):
    model = _copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["decoder"]["module_dict"]["dec_transformer"]["depth"] = 3
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(StateDictMismatch, match="dec_transformer.blocks.2"):
        load_pretrained("flextok_d12_d12", model, vae=FIXTURE / "vae")


# -- method settings (issue 10, item 5) -------------------------------------------------------------
def test_norm_guidance_adds_only_the_clipped_part_orthogonal_to_the_conditional():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    guided = flow.NormGuidance(momentum=0.0)(cond, uncond, 7.5)
    update = (guided - cond) / 6.5
    assert ((update * cond).sum(dim=(1, 2, 3)).abs() < 1e-4).all()  # orthogonal to c, per sample
    assert (update.flatten(1).norm(dim=1) <= 2.5 + 1e-5).all()  # clipped at the norm threshold
    diff = cond - uncond
    unit = cond / cond.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    orth = diff - (diff * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
    scale = torch.clamp(2.5 / diff.flatten(1).norm(dim=1), max=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(update, orth * scale, atol=1e-5, rtol=1e-5)


def test_norm_guidance_momentum_accumulates_over_the_steps():
    torch.manual_seed(0)
    guidance = flow.NormGuidance(momentum=-0.5, norm_threshold=0.0)
    c1, u1, c2, u2 = (torch.randn(1, 2, 2, 2) for _ in range(4))
    guidance(c1, u1, 2.0)
    second = guidance(c2, u2, 2.0)
    expected = flow.NormGuidance(momentum=0.0, norm_threshold=0.0)(c2, c2 - ((c2 - u2) - 0.5 * (c1 - u1)), 2.0)
    torch.testing.assert_close(second, expected)


def test_flextok_configs_decode_as_the_reference_with_the_vae_latent_scale():
    from hydra import compose, initialize_config_dir

    for experiment in ("flextok_d12_d12", "flextok_d18_d28"):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}"])
        tok = cfg.tokenizer
        assert (tok.decode_steps, tok.decode_guidance, tok.decode_guidance_method) == (20, 7.5, "apg"), experiment
        assert tuple(tok.decode_guidance_interval) == (0.0, 1.0) and tok.decode_shift == 1.0
        assert tok.latent_scale is None  # the VAE's scaling_factor (released) or measured, never a fixed 1.0
        assert cfg.callbacks.reconstruction_grid.decode_steps == 20


def test_decode_noise_comes_from_a_seeded_generator(released, expected):
    """Without ``noise`` two fresh tokenizers draw the same noise (evaluation reproducible run to
    run); successive calls draw new noise; decode_seed=None falls back to the global RNG."""
    tokens = expected["tokens"][:1, :2]
    again = load_pretrained("flextok_d12_d12", FIXTURE / "model", vae=FIXTURE / "vae", image_size=64)
    first = again.decode(tokens, steps=2)
    torch.manual_seed(123)
    fresh = load_pretrained("flextok_d12_d12", FIXTURE / "model", vae=FIXTURE / "vae", image_size=64)
    assert torch.equal(fresh.decode(tokens, steps=2), first)
    assert not torch.equal(fresh.decode(tokens, steps=2), first)
    unseeded = load_pretrained("flextok_d12_d12", FIXTURE / "model", vae=FIXTURE / "vae", image_size=64,
                               decode_seed=None)
    torch.manual_seed(0)
    a = unseeded.decode(tokens, steps=2)
    torch.manual_seed(0)
    assert torch.equal(unseeded.decode(tokens, steps=2), a)


def test_a_released_spec_with_the_vae_option_loads_where_checkpoints_are_accepted(expected, single_thread):
    """``pretrained:<name>:<dir>?vae:<dir>`` (evaluate.py checkpoints=, init_from=, the generator's
    tokenizer) reaches the same loader: same tokens, the source says released."""
    from tokenizers.loading import load_tokenizer

    tokenizer, cfg = load_tokenizer(f"pretrained:flextok_d12_d12:{FIXTURE / 'model'}?vae:{FIXTURE / 'vae'}"
                                    "?image_size:64")
    assert cfg.source.kind == "released"
    assert tokenizer.image_size == 64
    assert torch.equal(tokenizer.encode(expected["images"]), expected["tokens"])
