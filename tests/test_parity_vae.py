"""VA-VAE parity: the project's model loaded from a LightningDiT-layout file computes what
LightningDiT's own code computes (fp32, CPU).

Fixtures (``tests/fixtures/parity/vavae_*``) come from running the reference code
(``tokenizer/autoencoder.py`` of github.com/hustvl/LightningDiT) at reduced width with random
weights; ``scripts/parity/vavae_reference.py`` regenerates them from a local clone. The
released widths are checked by ``scripts/parity/vavae_fullsize_check.py`` (outside the fast
suite) and, without weights, by the layout test below.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokenizers.pretrained import MissingReleaseError, StateDictMismatch, load_pretrained
from tokenizers.pretrained import vavae as vavae_release
from tokenizers.vae import VAVAE, AutoencoderKL

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
RELEASE = FIXTURES / "vavae_small_release.pt"
RANDOM_TEACHER = {"name": "dinov2_l", "weights": None, "random": True}


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "vavae_small_outputs.pt", weights_only=True)


def _arch(reference) -> dict:
    a = reference["architecture"]
    return dict(width=a["ch"], mults=tuple(a["ch_mult"]), num_res_blocks=a["num_res_blocks"], embed_dim=a["embed_dim"])


@pytest.fixture(scope="module")
def model(reference):
    return load_pretrained("vavae_f16d32", RELEASE, teacher=RANDOM_TEACHER, **_arch(reference))


def test_release_loads_as_the_projects_vavae_in_eval_mode_fp32(model, reference):
    assert isinstance(model, VAVAE) and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.ignored_keys == ["loss.logvar"]  # training-only, named
    state = torch.load(RELEASE, weights_only=True)["state_dict"]
    assert torch.equal(model.vf_projection.weight, state["linear_proj.weight"].float())
    assert model.released_from["name"] == "vavae_f16d32"


def test_posterior_mean_and_log_variance_match_the_reference(model, reference):
    with torch.no_grad():
        posterior = model.posterior(reference["images"])
    # the fixture puts a quarter of the log-variance channels above and a quarter below the clamp
    assert (reference["logvar"] == 20.0).any() and (reference["logvar"] == -30.0).any()
    assert (posterior.mean - reference["mean"]).abs().max().item() < 1e-4
    assert (posterior.logvar - reference["logvar"]).abs().max().item() < 1e-4
    assert torch.equal(model.encode(reference["images"]), posterior.mean)  # encode = the posterior mode


def test_decoded_images_match_the_reference(model, reference):
    with torch.no_grad():
        from_mean = model.decode(model.encode(reference["images"]))
        from_latents = model.decode(reference["latents"])
    assert (from_mean - reference["decoded_mean"]).abs().max().item() < 1e-3
    assert (from_latents - reference["decoded_latents"]).abs().max().item() < 1e-3


def test_full_size_model_has_the_released_layout():
    """Every key and shape of the released f16d32 file (layout dumped from the reference at
    full size) maps onto the project's full-size model built from conf/tokenizer, and back."""
    layout = json.loads((FIXTURES / "vavae_f16d32_layout.json").read_text())
    converted = vavae_release.convert({k: torch.empty(v, device="meta") for k, v in layout.items()})
    with torch.device("meta"):
        full = vavae_release.build()
    own = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == own


def test_plain_autoencoder_option_ignores_the_vf_projection(reference):
    from tokenizers.loading import parse_released

    a = _arch(reference)  # as a pretrained: spec string passes them: text
    spec = parse_released(f"pretrained:vavae_f16d32:{RELEASE}?vf:false?width:{a['width']}?num_res_blocks:"
                          f"{a['num_res_blocks']}?embed_dim:{a['embed_dim']}?mults:{','.join(map(str, a['mults']))}")
    vae = load_pretrained(spec.name, spec.path, **spec.options)
    assert type(vae) is AutoencoderKL
    assert vae.ignored_keys == ["loss.logvar", "vf_projection.weight"]


def test_a_file_that_does_not_fit_names_every_bad_key(tmp_path, reference):
    state = dict(torch.load(RELEASE, weights_only=True)["state_dict"])
    del state["decoder.up.0.block.1.conv1.weight"]
    state["encoder.conv_out.bias"] = torch.zeros(3)
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(StateDictMismatch) as err:
        load_pretrained("vavae_f16d32", tmp_path / "bad.pt", teacher=RANDOM_TEACHER, **_arch(reference))
    message = str(err.value)
    # decoder.up.0 is the finest level: the last the project runs
    assert "decoder.levels.2.1.conv1.weight" in message
    assert "encoder.extra.weight" in message
    assert "encoder.conv_out.bias: file (3,)" in message


def test_a_missing_file_names_the_file_where_it_is_published_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MissingReleaseError) as err:
        load_pretrained("vavae_f16d32", tmp_path / "nowhere")
    message = str(err.value)
    assert "vavae-imagenet256-f16d32-dinov2.pt" in message
    assert "huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2" in message
    assert "path=" in message


def test_unknown_options_are_rejected_with_the_known_ones():
    with pytest.raises(TypeError, match="vf, teacher, teacher_weights"):
        load_pretrained("vavae_f16d32", RELEASE, ema="true")
