"""LlamaGen VQ and FQGAN: the project's models compute what the reference code computes.

Parity fixtures (``tests/fixtures/parity/*.pt``, made by ``scripts/parity/llamagen_fqgan.py``
from local clones of LlamaGen and FQGAN) hold a reference model's state-dict layout, the
seed of its weights (``tokenizers.pretrained.synthetic``), input images and what the
reference code returned for them: token indices and decoded images. Each test rebuilds the
reference-format weights, loads them through the release's converter into the project's
model and compares (indices >= 99.9 % equal, decoded images within 1e-3, fp32 on CPU).

Also here: the method settings taken from these references (the discriminator loss
weighted as LlamaGen weights it, FQGAN's CLIP target before CLIP's final LayerNorm).
"""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import ROOT


# -- method settings (issue 10, item 5) -----------------------------------------------------------


def _compose(overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_discriminator_loss_weighted_like_llamagen():
    """LlamaGen/FQGAN's VQLoss returns ``disc_weight * hinge_d_loss``; taming's the plain hinge."""
    from tokenizers.gan import NLayerDiscriminator, PatchGANHinge

    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, n_layers=2).eval()
    real, fake = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    plain = PatchGANHinge(disc, disc_weight=0.5, weight_disc_loss=False)
    llamagen = PatchGANHinge(disc, disc_weight=0.5, weight_disc_loss=True)
    expected = 0.5 * (torch.relu(1 - disc(real)).mean() + torch.relu(1 + disc(fake)).mean())
    torch.testing.assert_close(plain.discriminator_loss(real, fake)[0], expected)
    torch.testing.assert_close(llamagen.discriminator_loss(real, fake)[0], 0.5 * expected)
    for experiment in ("vqgan_llamagen_in1k256", "fqgan_dual_in1k256", "fqgan_triple_in1k256"):
        gan = _compose([f"experiment={experiment}"]).gan
        assert gan.weight_disc_loss is True and gan.disc_weight == 0.5, experiment


def test_teacher_target_before_final_norm():
    """``final_norm: false`` returns the last block's tokens before the ViT's final norm (FQGAN's
    CLIP target: Hugging Face ``hidden_states[-1]``); the default returns them after it."""
    from tokenizers.teachers import TeacherHandle

    handle = TeacherHandle({"name": "parity_vq", "random": True, "final_norm": False})
    images = torch.rand(2, 3, 40, 40) * 2 - 1
    model = handle.teacher.model
    x = handle.teacher.preprocess(images)
    blocks_out = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))
    before = handle(images)
    after = handle.teacher(images)  # default: after the final norm
    torch.testing.assert_close(before.cls, blocks_out[:, 0])
    torch.testing.assert_close(before.patches, blocks_out[:, model.num_prefix_tokens:])
    torch.testing.assert_close(after.cls, model.norm(blocks_out)[:, 0])
    assert (before.cls - after.cls).abs().max() > 0.1


def test_teacher_input_resized_like_fqgan():
    """FQGAN's ScalingLayer: [-1, 1] -> [0, 1], ``F.interpolate`` to 224 with its default
    (nearest), then the teacher's mean/std; the handle takes the mode from its spec."""
    import torch.nn.functional as F

    from tokenizers.teachers import TeacherHandle

    handle = TeacherHandle({"name": "parity_vq", "random": True, "input_mode": "normalized_nearest"})
    teacher = handle.teacher
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = (F.interpolate((images + 1) / 2, size=(teacher.image_size,) * 2) - teacher.mean) / teacher.std
    torch.testing.assert_close(teacher.preprocess(images, "normalized_nearest"), expected)
    torch.testing.assert_close(handle(images).cls, teacher.model.forward_features(expected)[:, 0])
    assert (teacher.preprocess(images) - expected).abs().max() > 0.05  # the default (bicubic) differs


@pytest.mark.parametrize("tokenizer, targets", [("fqgan_dual", {"clip": False}),
                                                ("fqgan_triple", {"dino": True, "clip": False})])
def test_fqgan_configs_take_teacher_targets_where_the_reference_does(tokenizer, targets):
    """FQGAN: CLIP's ``hidden_states[-1]`` (before the final norm), DINOv2's
    ``last_hidden_state`` (after it); the heads have 8 attention heads."""
    cfg = _compose([f"tokenizer={tokenizer}", "scale=reference"]).tokenizer
    for name, final_norm in targets.items():
        assert cfg.branches[name].teacher.get("final_norm", True) is final_norm, name
        assert cfg.branches[name].teacher.input_mode == "normalized_nearest", name
    assert cfg.head.num_heads == 8 and cfg.adapter.num_heads == 8


# -- parity with the reference code (issue 10, item 4) --------------------------------------------

FIXTURES = ROOT / "tests" / "fixtures" / "parity"
LLAMAGEN = ["llamagen_vq16", "llamagen_vq8"]
FQGAN = ["fqgan_dual_ds16", "fqgan_triple_ds16", "fqgan_dual_ds8", "fqgan_triple_ds8"]
INDEX_AGREEMENT = 0.999  # fraction of equal token indices
DECODE_ATOL = 1e-3  # max abs difference of decoded images in [-1, 1] units, fp32 CPU


def load_fixture(name: str) -> dict:
    path = FIXTURES / f"{name}.pt"
    if not path.is_file():
        pytest.fail(f"{path} missing. Fix: regenerate it with scripts/parity/llamagen_fqgan_reference.py (see its docstring).")
    return torch.load(path, map_location="cpu", weights_only=False)


def reference_state(fixture: dict) -> dict:
    """The reference-format state dict the reference code ran with (layout + seed)."""
    from tokenizers.pretrained.synthetic import seeded_state_dict

    return seeded_state_dict(fixture["layout"], fixture["seed"])


def project_model(fixture: dict, state: dict | None = None, heads: bool = False):
    """The project's model for the fixture's release, loaded through the release's converter."""
    from tokenizers.pretrained import fqgan, llamagen

    state = reference_state(fixture) if state is None else state
    arch = dict(fixture["architecture"])
    if "variant" in arch:
        variant = arch.pop("variant")
        teachers = None
        if heads:  # random teachers of the head width (64): built lazily, never run here
            names = [n for n, module in fqgan.BRANCHES[variant].values() if module]
            teachers = {n: {"name": "random", "random": True} for n in names}
        model = fqgan.build(variant, heads=heads, teachers=teachers, **arch)
        return fqgan.load_state(model, state, variant, fixture["release"], heads=heads)
    return llamagen.load_state(llamagen.build(**arch), state, fixture["release"])


def latents_before_quantization(model, images) -> list:
    """What each codebook's quantizer receives (the reference's ``quant_conv`` outputs)."""
    if hasattr(model, "branches"):
        trunk = model.encoder.trunk(images)
        return [branch.quant_conv(branch.adapter(trunk)) for branch in model.branches.values()]
    return [model.quant_conv(model.encoder(images))]


def compare(model, fixture: dict) -> dict[str, float]:
    """Max abs difference of the latents before quantization, fraction of equal token
    indices, max abs difference of the images decoded from the reference's indices."""
    images = fixture["images_uint8"].float() / 127.5 - 1.0
    expected = [t.long() for t in fixture["indices"]]
    with torch.no_grad():
        latents = latents_before_quantization(model, images)
        tokens = model.encode(images)
        tokens = list(tokens) if isinstance(tokens, (tuple, list)) else [tokens]
        decoded = model.decode(expected if len(expected) > 1 else expected[0])
    return {
        "latent_diff": max((a - b).abs().max().item() for a, b in zip(latents, fixture["latents"])),
        "agreement": sum((a == b).sum().item() for a, b in zip(tokens, expected)) / sum(t.numel() for t in expected),
        "decode_diff": (decoded - fixture["decoded"]).abs().max().item(),
    }


@pytest.mark.parametrize("name", LLAMAGEN + FQGAN)
def test_parity_with_reference(name):
    """Same latents (1e-4), token indices (>= 99.9 %) and decoded images (1e-3) as the reference."""
    fixture = load_fixture(name)
    got = compare(project_model(fixture), fixture)
    assert got["latent_diff"] <= 1e-4, f"{name}: latents before quantization differ by up to {got['latent_diff']:.2e}"
    assert got["agreement"] >= INDEX_AGREEMENT, f"{name}: {got['agreement']:.2%} of the token indices equal the reference's"
    assert got["decode_diff"] <= DECODE_ATOL, f"{name}: decoded images differ by up to {got['decode_diff']:.2e}"


@pytest.mark.parametrize("name", ["fqgan_dual_ds16", "fqgan_triple_ds8"])
def test_fqgan_heads_parity(name):
    """With ``heads=True`` the representation heads load too and compute the reference's class
    token (FeatPredHead: 8 heads, positional embedding on the class token)."""
    fixture = load_fixture(name)
    model = project_model(fixture, heads=True)
    names = [n for n, b in model.branches.items() if b.head is not None]
    assert len(names) == len(fixture["heads"]) > 0
    for branch_name, tokens, expected in zip(names, fixture["indices"][1:], fixture["heads"]):
        branch = model.branches[branch_name]
        with torch.no_grad():
            out = branch.head(branch.quantizer.lookup(tokens.long()))
        assert (out - expected).abs().max().item() <= 1e-4, branch_name


def test_fqgan_training_heads_ignored_by_name_and_reported():
    fixture = load_fixture("fqgan_triple_ds16")
    model = project_model(fixture)
    heads = {k.split(".")[0] for k in fixture["layout"] if "feat_pred" in k}
    assert heads == {"mid_sem_feat_pred", "high_sem_feat_pred"}
    reported = {k for k in model.ignored_keys if ".head." in k}
    expected = sum(1 for k in fixture["layout"] if k.split(".")[0] in heads)
    assert len(reported) == expected and all(b.head is None for b in model.branches.values())


# -- released files through load_pretrained -------------------------------------------------------


def _small_options(fixture: dict) -> dict:
    arch = {k: v for k, v in fixture["architecture"].items() if k not in ("ds", "variant")}
    return {k: str(v) for k, v in arch.items()}  # as a pretrained: spec passes them


@pytest.mark.parametrize("name", ["llamagen_vq8", "fqgan_triple_ds16"])
def test_load_pretrained_reads_released_layout(tmp_path, name):
    """A file laid out as the release (LlamaGen's training checkpoint: ``model``, ``ema``,
    optimizer and discriminator states) loads through ``load_pretrained`` with its EMA weights,
    as LlamaGen's and FQGAN's own evaluation scripts choose, and matches the reference."""
    from tokenizers.pretrained import load_pretrained, releases

    fixture = load_fixture(name)
    ema = reference_state(fixture)
    raw = {k: v + 0.5 for k, v in ema.items()}  # the non-EMA weights: must not be the ones loaded
    path = tmp_path / releases()[name].files[0]
    torch.save({"model": raw, "ema": ema, "optimizer": {"state": {}}, "discriminator": {}, "steps": 1}, path)
    model = load_pretrained(name, tmp_path, **_small_options(fixture))  # a directory holding the file
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    got = compare(model, fixture)
    assert got["agreement"] >= INDEX_AGREEMENT and got["decode_diff"] <= DECODE_ATOL, got
    assert any(k.endswith("codebook_used") for k in model.ignored_keys)


def test_missing_release_names_file_place_and_option(tmp_path):
    from tokenizers.pretrained import MissingReleaseError, load_pretrained

    with pytest.raises(MissingReleaseError) as error:
        load_pretrained("fqgan_dual_ds8", tmp_path / "elsewhere")
    message = str(error.value)
    assert "fqgan_dual_ds8.pt" in message and "huggingface.co/ZechenBai/FQGAN" in message and "path=" in message


def test_wrong_release_file_lists_mismatched_keys():
    """A ds8 file named as ds16 stops with the keys and shapes that do not fit, loading nothing."""
    from tokenizers.pretrained import StateDictMismatch, llamagen

    fixture = load_fixture("llamagen_vq8")
    arch = {k: v for k, v in fixture["architecture"].items() if k != "ds"}
    model = llamagen.build(16, **arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateDictMismatch) as error:
        llamagen.load_state(model, reference_state(fixture), "vq_ds8_c2i.pt")
    assert "missing in the file" in str(error.value) and "shape mismatch" in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", LLAMAGEN + FQGAN)
def test_full_size_configs_hold_the_released_layout(name):
    """The project's full-size model from ``conf/tokenizer`` takes every tensor of the released
    architecture (layout dumped from the reference code) with its shape, heads included;
    built on the meta device, so no memory or time is spent on weights."""
    import json

    from tokenizers.pretrained import fqgan, llamagen
    from tokenizers.pretrained.common import load_exact

    layout = json.loads((FIXTURES / "llamagen_fqgan_layouts.json").read_text())[name]
    state = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    with torch.device("meta"):
        if name.startswith("fqgan"):
            variant, ds = name.split("_")[1], int(name.rsplit("ds", 1)[1])
            model = fqgan.build(variant, ds, heads=True)
            converted = fqgan.convert(state, variant)
        else:
            model = llamagen.build(int(name.rsplit("vq", 1)[1]))
            converted = llamagen.convert(state)
    ignored = load_exact(model, converted, name, ignore=lambda k: k.endswith("codebook_used"))
    assert len(ignored) == len(model.codebook_sizes)  # one usage buffer per codebook, nothing else
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(math.prod(s) for k, s in layout.items() if not k.endswith("codebook_used"))
