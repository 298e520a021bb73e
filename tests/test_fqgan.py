"""FQGAN: disentanglement and semantic losses, factorized encode/decode, resolutions, configs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tokenizers import teachers
from tokenizers.conv import Decoder, Encoder
from tokenizers.fqgan import FQGAN, disentanglement_loss, semantic_loss
from tokenizers.teachers import TeacherWeightsNotFound

CONF = Path(__file__).resolve().parents[1] / "conf"
RANDOM_TEACHER = {"weights": None, "random": True}


def tiny_fqgan(k: int = 3, disentangle_weight: float = 0.1, mults=(1, 2, 2), **kwargs) -> FQGAN:
    torch.manual_seed(0)
    branches = {"visual": {}}
    if k >= 2:
        branches["dino"] = {"teacher": {"name": "dinov2_s", **RANDOM_TEACHER}, "semantic_weight": 0.5}
    if k >= 3:
        branches["clip"] = {"teacher": {"name": "clip_b16", **RANDOM_TEACHER}, "semantic_weight": 0.25}
    return FQGAN(
        Encoder(width=8, mults=mults, num_res_blocks=1, z_channels=16),
        Decoder(width=8, mults=mults, num_res_blocks=1, z_channels=16),
        branches=branches,
        quantizer=dict(codebook_size=32, code_dim=4),
        adapter=dict(depth=1, num_heads=2, pos_grid=4),
        head=dict(width=16, depth=1, num_heads=2, pos_grid=4),
        disentangle_weight=disentangle_weight,
        **kwargs,
    )


def images(b: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# -- disentanglement ---------------------------------------------------------------------------


def test_disentanglement_is_zero_for_orthogonal_codes():
    a = torch.zeros(2, 8, 4, 4)
    b = torch.zeros(2, 8, 4, 4)
    a[:, 0] = torch.rand(2, 4, 4) + 0.1
    b[:, 1] = -torch.rand(2, 4, 4) - 0.1
    assert disentanglement_loss([a, b]).item() == pytest.approx(0.0, abs=1e-7)


def test_disentanglement_is_one_for_parallel_codes():
    a = torch.randn(4, 8, 16, 16)
    assert disentanglement_loss([a, 2 * a]).item() == pytest.approx(1.0, abs=1e-6)
    assert disentanglement_loss([a, -a]).item() == pytest.approx(1.0, abs=1e-6)  # squared: sign-blind


def test_disentanglement_matches_a_direct_computation():
    a, b = torch.randn(3, 8, 5, 6), torch.randn(3, 8, 5, 6)
    total = 0.0
    for n in range(3):
        for i in range(5):
            for j in range(6):
                u, v = a[n, :, i, j], b[n, :, i, j]
                total += (torch.dot(u, v) / (u.norm() * v.norm())).item() ** 2
    assert disentanglement_loss([a, b]).item() == pytest.approx(total / (3 * 5 * 6), rel=1e-5)


def test_triple_disentanglement_is_the_mean_of_the_pairwise_terms():
    a, b, c = (torch.randn(2, 8, 4, 4) for _ in range(3))
    pairwise = [disentanglement_loss(p).item() for p in ([a, b], [a, c], [b, c])]
    assert disentanglement_loss([a, b, c]).item() == pytest.approx(sum(pairwise) / 3, rel=1e-6)


def test_disentanglement_rejects_branches_of_different_code_dim():
    with pytest.raises(ValueError, match="code_dim"):
        disentanglement_loss([torch.randn(1, 8, 2, 2), torch.randn(1, 4, 2, 2)])


# -- semantic loss -------------------------------------------------------------------------------


def test_semantic_loss_equals_a_direct_cross_entropy():
    pred, target = torch.randn(5, 12), torch.randn(5, 12)
    loss, _ = semantic_loss(pred, target, temperature=1.0)
    expected = 0.0
    for i in range(5):
        p = pred[i] / pred[i].norm()
        logits = torch.stack([torch.dot(p, target[j] / target[j].norm()) for j in range(5)])
        expected += -(logits[i] - torch.logsumexp(logits, 0)).item()
    assert loss.item() == pytest.approx(expected / 5, rel=1e-5)


def test_semantic_loss_divides_the_logits_by_the_temperature():
    pred, target = torch.randn(4, 6), torch.randn(4, 6)
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).t()
    loss, _ = semantic_loss(pred, target, temperature=0.1)
    assert loss.item() == pytest.approx(F.cross_entropy(logits / 0.1, torch.arange(4)).item(), rel=1e-5)


def test_semantic_loss_sends_no_gradient_to_the_teacher():
    pred, target = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    semantic_loss(pred, target)[0].backward()
    assert pred.grad is not None and target.grad is None


def test_gathering_negatives_on_a_single_process_is_the_local_loss():
    pred, target = torch.randn(4, 6), torch.randn(4, 6)
    assert semantic_loss(pred, target, gather_negatives=True)[0].item() == pytest.approx(
        semantic_loss(pred, target)[0].item(), rel=1e-6
    )


# -- the tokenizer ------------------------------------------------------------------------------


def test_encode_returns_one_index_map_per_branch():
    model = tiny_fqgan(k=3).eval()
    tokens = model.encode(images(2, 32))
    assert len(tokens) == 3
    for t, k in zip(tokens, model.codebook_sizes):
        assert t.shape == (2, *model.token_shape(32)) and t.dtype == torch.long
        assert 0 <= int(t.min()) and int(t.max()) < k


def test_decode_of_encode_equals_the_forward_reconstruction_in_eval_mode():
    model = tiny_fqgan(k=3).eval()
    x = images(2, 32)
    with torch.no_grad():
        forward = model(x).reconstruction
        roundtrip = model.decode(model.encode(x))
    torch.testing.assert_close(roundtrip, forward, atol=1e-5, rtol=0)


def test_decode_latents_of_encode_latents_equals_the_forward_reconstruction_in_eval_mode():
    model = tiny_fqgan(k=2).eval()
    x = images(2, 32)
    with torch.no_grad():
        latents = model.encode_latents(x)
        assert latents.shape == (2, *model.latent_shape(32))
        torch.testing.assert_close(model.decode_latents(latents), model(x).reconstruction, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_token_grid_follows_the_resolution(size):
    model = tiny_fqgan(k=3, mults=(1, 2, 2, 2))  # downsample 8: 8x8 .. 32x32 tokens
    out = model(images(1, size))
    assert out.reconstruction.shape == (1, 3, size, size)
    assert out.latents.shape == (1, 12, size // 8, size // 8)
    assert model.token_shape(size) == (size // 8, size // 8)


def test_forward_logs_per_branch_usage_cosine_and_semantic_losses():
    model = tiny_fqgan(k=3)
    out = model(images(4, 32))
    for name in ("visual", "dino", "clip"):
        assert {f"{name}/usage_batch", f"{name}/perplexity"} <= set(out.logs)
    assert {"branch_cos2", "branch_cos2/visual-dino", "semantic/dino", "semantic/clip"} <= set(out.logs)
    assert {"disentanglement", "semantic/dino", "semantic/clip", "visual/codebook", "clip/commitment"} <= set(out.losses)


def test_losses_carry_their_configured_weights():
    model = tiny_fqgan(k=3, disentangle_weight=0.1)
    out = model(images(4, 32))
    torch.testing.assert_close(out.losses["disentanglement"], 0.1 * out.logs["branch_cos2"])
    torch.testing.assert_close(out.losses["semantic/dino"], 0.5 * out.logs["semantic/dino"])
    torch.testing.assert_close(out.losses["semantic/clip"], 0.25 * out.logs["semantic/clip"])


def test_branch_cosine_is_logged_with_the_disentanglement_loss_off():
    out = tiny_fqgan(k=2, disentangle_weight=0.0)(images(2, 32))
    assert "disentanglement" not in out.losses
    assert 0.0 <= float(out.logs["branch_cos2"]) <= 1.0


def test_every_parameter_is_trained_and_no_teacher_parameter_is_owned():
    model = tiny_fqgan(k=3)
    x = images(2, 32)
    out = model(x)
    (sum(out.losses.values()) + F.mse_loss(out.reconstruction, x)).backward()
    untrained = [n for n, p in model.named_parameters() if p.grad is None]
    assert untrained == []  # DDP without find_unused_parameters needs this
    assert not any("teacher" in k for k in model.state_dict())


def test_facts_for_the_report():
    model = tiny_fqgan(k=3)
    assert model.discrete and model.codebook_sizes == (32, 32, 32)
    assert model.tokens_per_image(32) == 3 * 8 * 8
    assert model.bits_per_image(32) == pytest.approx(3 * 64 * math.log2(32))
    assert model.decoder_last_layer() is model.decoder.conv_out.weight


def test_missing_branch_teacher_weights_stop_construction_naming_the_branch_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    teachers.clear_cache()
    with pytest.raises(TeacherWeightsNotFound, match=r"tokenizer\.branches\.clip\.teacher\.weights"):
        FQGAN(
            Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=8),
            Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=8),
            branches={"visual": {}, "clip": {"teacher": {"name": "clip_l14", "weights": None, "random": False}}},
            quantizer=dict(codebook_size=16, code_dim=4),
            adapter=dict(depth=0, num_heads=1, pos_grid=4),
        )


def test_fqgan_needs_two_branches():
    with pytest.raises(ValueError, match="two branches"):
        FQGAN(Encoder(width=8, mults=(1, 2), z_channels=8), Decoder(width=8, mults=(1, 2), z_channels=8),
              branches={"visual": {}}, adapter=dict(depth=0, num_heads=1))


# -- configs -------------------------------------------------------------------------------------


def compose_tokenizer(name: str, scale: str | None, teacher_random: bool = True):
    node = OmegaConf.load(CONF / "tokenizer" / f"{name}.yaml")
    if scale:
        node = OmegaConf.merge(node, OmegaConf.load(CONF / "tokenizer_scale" / f"{name}_{scale}.yaml"))
    return OmegaConf.create({"teacher": {"random": teacher_random}, "tokenizer": node})


@pytest.mark.parametrize("name,k", [("fqgan_dual", 2), ("fqgan_triple", 3)])
def test_smoke_configs_build_and_run_with_random_teachers(name, k):
    teachers.clear_cache()
    cfg = compose_tokenizer(name, "smoke")
    model = instantiate(cfg.tokenizer)
    assert len(model.codebook_sizes) == k
    out = model(images(2, 32))
    assert out.reconstruction.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name,teachers_expected", [
    ("fqgan_dual", {"clip": "clip_l14"}),
    ("fqgan_triple", {"dino": "dinov2_s", "clip": "clip_b16"}),
])
def test_reference_configs_state_the_papers_settings(name, teachers_expected):
    cfg = OmegaConf.load(CONF / "tokenizer" / f"{name}.yaml")
    assert cfg.encoder.width == 128 and list(cfg.encoder.mults) == [1, 1, 2, 2, 4] and cfg.encoder.z_channels == 256
    assert cfg.quantizer.codebook_size == 16384 and cfg.quantizer.code_dim == 8 and cfg.quantizer.beta == 0.25
    assert dict(cfg.adapter) == {"depth": 6, "num_heads": 8, "mlp_ratio": 4.0, "pos_grid": 16}
    assert cfg.head.depth == 3 and cfg.head.width is None  # = teacher width: 1024 / 384 / 768
    assert cfg.disentangle_weight == 0.1 and cfg.semantic_temperature == 1.0
    assert list(cfg.branches)[0] == "visual" and "teacher" not in cfg.branches.visual
    for branch, teacher in teachers_expected.items():
        assert cfg.branches[branch].teacher.name == teacher and cfg.branches[branch].semantic_weight == 0.5


def test_teacher_random_switches_the_branch_teachers():
    cfg = compose_tokenizer("fqgan_triple", "smoke", teacher_random=True)
    assert cfg.tokenizer.branches.dino.teacher.random is True
    cfg = compose_tokenizer("fqgan_triple", "smoke", teacher_random=False)
    assert cfg.tokenizer.branches.clip.teacher.random is False


# -- gathering negatives across ranks (two gloo processes) ---------------------------------------


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(world, 3, 6, generator=g)
    targets = torch.randn(world, 3, 6, generator=g)
    pred = preds[rank].clone().requires_grad_(True)
    loss, _ = semantic_loss(pred, targets[rank], gather_negatives=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": pred.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_negatives_are_all_ranks_targets_with_the_local_gradient(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(world, 3, 6, generator=g)
    targets = torch.randn(world, 3, 6, generator=g)
    all_targets = F.normalize(targets.reshape(-1, 6), dim=-1)
    for rank in range(world):
        pred = preds[rank].clone().requires_grad_(True)
        logits = F.normalize(pred, dim=-1) @ all_targets.t()
        expected = F.cross_entropy(logits, torch.arange(3) + 3 * rank)
        expected.backward()
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(got["grad"], pred.grad, atol=1e-6, rtol=1e-5)


def test_without_loading_teachers_a_model_builds_encodes_and_decodes_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    teachers.clear_cache()
    torch.manual_seed(0)
    model = FQGAN(
        Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=8),
        Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=8),
        branches={"visual": {}, "clip": {"teacher": {"name": "clip_b16", "weights": None, "random": False}}},
        quantizer=dict(codebook_size=16, code_dim=4),
        adapter=dict(depth=0, num_heads=1, pos_grid=4),
        head=dict(width=16, depth=1, num_heads=2, pos_grid=4),
        load_teachers=False,
    ).eval()
    assert model.branches["clip"].head.proj.out_features == 768  # CLIP-B/16's width, from the architecture
    x = images(1, 16)
    assert model.decode(model.encode(x)).shape == x.shape
    with pytest.raises(TeacherWeightsNotFound):  # the semantic loss still needs the real teacher
        model(x)
