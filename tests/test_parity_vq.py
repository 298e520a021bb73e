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


@pytest.mark.parametrize("tokenizer, targets", [("fqgan_dual", {"clip": False}),
                                                ("fqgan_triple", {"dino": True, "clip": False})])
def test_fqgan_configs_take_teacher_targets_where_the_reference_does(tokenizer, targets):
    """FQGAN: CLIP's ``hidden_states[-1]`` (before the final norm), DINOv2's
    ``last_hidden_state`` (after it); the heads have 8 attention heads."""
    cfg = _compose([f"tokenizer={tokenizer}", "scale=reference"]).tokenizer
    for name, final_norm in targets.items():
        assert cfg.branches[name].teacher.get("final_norm", True) is final_norm, name
    assert cfg.head.num_heads == 8 and cfg.adapter.num_heads == 8
