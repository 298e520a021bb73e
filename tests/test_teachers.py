"""Frozen teachers: interface, frozen/eval, preprocessing, weight loading, cache, handle."""
from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn

from tokenizers import teachers
from tokenizers.teachers import (
    FrozenTeacher,
    TeacherHandle,
    TeacherWeightsNotFound,
    get_teacher,
)

# DINOv2 normalises with the ImageNet statistics (stated here independently of timm's cfg)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _fresh_cache():
    teachers.clear_cache()
    yield
    teachers.clear_cache()


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def saved_dinov2_s(tmp_path_factory):
    """A randomly initialised DINOv2-S/14 (the real architecture at 224 px) and its weights file."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def images(b: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def test_random_teacher_has_the_teacher_interface():
    t = get_teacher({"name": "random", "weights": None, "random": True})
    feats = t(images(3))
    h, w = feats.grid
    assert feats.cls.shape == (3, t.embed_dim)
    assert feats.patches.shape == (3, h * w, t.embed_dim)


def test_teacher_parameters_are_frozen():
    t = get_teacher({"name": "random", "random": True})
    assert all(not p.requires_grad for p in t.parameters())


def test_teacher_stays_in_eval_mode_when_its_owner_trains():
    t = get_teacher({"name": "random", "random": True})
    owner = nn.Sequential(t)
    owner.train()
    assert not t.training and not any(m.training for m in t.modules())


def test_teacher_output_carries_no_gradient():
    t = get_teacher({"name": "random", "random": True})
    x = images().requires_grad_(True)
    assert not t(x).cls.requires_grad


def test_same_spec_returns_the_same_teacher():
    a = get_teacher({"name": "dinov2_s", "weights": None, "random": True})
    b = get_teacher(OmegaConf.create({"name": "dinov2_s", "weights": None, "random": True}))
    assert a is b


def test_random_teachers_are_reproducible_and_differ_by_name():
    a = get_teacher({"name": "dinov2_s", "random": True})(images()).cls
    other = get_teacher({"name": "clip_b16", "random": True})(images()).cls
    teachers.clear_cache()
    again = get_teacher({"name": "dinov2_s", "random": True})(images()).cls
    assert torch.equal(a, again)  # every process / DDP rank builds the same network
    assert not torch.allclose(a, other)


def test_preprocess_maps_minus_one_to_one_onto_normalised_unit_range_at_image_size():
    t = get_teacher({"name": "random", "random": True})
    x = images(2, t.image_size)  # no resize at the teacher's own size
    expected = ((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(t.preprocess(x), expected, atol=1e-6, rtol=0)
    assert t.preprocess(images(2, 40)).shape[-2:] == (t.image_size, t.image_size)


def test_teacher_rejects_images_without_three_channels():
    t = get_teacher({"name": "random", "random": True})
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        t(torch.zeros(1, 1, 32, 32))


def test_teacher_from_local_file_matches_the_model_it_was_saved_from(saved_dinov2_s):
    model, path = saved_dinov2_s
    t = get_teacher({"name": "dinov2_s", "weights": str(path), "random": False})
    x = images(2, 64)
    # the documented preprocessing: [-1,1] -> [0,1] -> bicubic antialiased 224 -> ImageNet mean/std
    x224 = F.interpolate((x + 1) / 2, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        tokens = model.forward_features((x224 - IMAGENET_MEAN) / IMAGENET_STD)
    feats = t(x)
    assert feats.grid == (16, 16) and t.embed_dim == 384
    torch.testing.assert_close(feats.cls, tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.patches, tokens[:, 1:], atol=1e-5, rtol=1e-5)


def test_teacher_is_found_in_the_hugging_face_cache(saved_dinov2_s, empty_hf_cache):
    model, path = saved_dinov2_s
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/file}
    repo = empty_hf_cache / "models--timm--vit_small_patch14_dinov2.lvd142m"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(path.read_bytes())
    t = get_teacher({"name": "dinov2_s", "weights": None, "random": False})
    torch.testing.assert_close(t.model.pos_embed, model.pos_embed)


def test_explicit_path_to_a_cached_file_shares_the_cached_teacher(saved_dinov2_s, empty_hf_cache):
    _, path = saved_dinov2_s
    snapshot = empty_hf_cache / "models--timm--vit_small_patch14_dinov2.lvd142m" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (empty_hf_cache / "models--timm--vit_small_patch14_dinov2.lvd142m" / "refs").mkdir()
    (empty_hf_cache / "models--timm--vit_small_patch14_dinov2.lvd142m" / "refs" / "main").write_text("1" * 40)
    (snapshot / "model.safetensors").symlink_to(path)
    from_cache = get_teacher({"name": "dinov2_s", "weights": None})
    assert get_teacher({"name": "dinov2_s", "weights": str(path)}) is from_cache


def test_missing_weights_name_the_config_key_the_cache_and_the_random_fallback(empty_hf_cache):
    with pytest.raises(TeacherWeightsNotFound) as err:
        get_teacher({"name": "dinov2_l", "weights": None, "random": False})
    message = str(err.value)
    assert "teacher.weights=" in message
    assert str(empty_hf_cache) in message and "vit_large_patch14_dinov2.lvd142m" in message
    assert "teacher=random" in message


def test_missing_weights_name_the_callers_config_key(empty_hf_cache):
    spec = {"name": "clip_b16", "weights": None, "random": False, "weights_key": "tokenizer.branches.clip.teacher.weights"}
    with pytest.raises(TeacherWeightsNotFound, match=r"tokenizer\.branches\.clip\.teacher\.weights=/path"):
        get_teacher(spec)


def test_a_weights_path_that_does_not_exist_is_reported(tmp_path, empty_hf_cache):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TeacherWeightsNotFound, match="nope.safetensors"):
        get_teacher({"name": "dinov2_s", "weights": str(missing)})


def test_unknown_teacher_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="dinov2_s"):
        get_teacher({"name": "dinov3_xl", "weights": None})


class Owner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.teacher = TeacherHandle({"name": "random", "random": True})


def test_handle_keeps_the_teacher_out_of_the_owners_parameters_and_state_dict():
    owner = Owner()
    assert isinstance(owner.teacher.teacher, FrozenTeacher)
    assert {n for n, _ in owner.named_parameters()} == {"layer.weight", "layer.bias"}
    assert set(owner.state_dict()) == {"layer.weight", "layer.bias"}


def test_deep_copies_of_the_owner_share_one_teacher():
    owner = Owner()
    ema = copy.deepcopy(owner)
    assert ema.teacher.teacher is owner.teacher.teacher


def test_unpickled_handle_rebuilds_the_shared_teacher():
    owner = Owner()
    restored = pickle.loads(pickle.dumps(owner))
    assert restored.teacher.teacher is owner.teacher.teacher


def test_handle_returns_the_teachers_features():
    handle = TeacherHandle({"name": "random", "random": True})
    x = images()
    torch.testing.assert_close(handle(x).cls, get_teacher({"name": "random", "random": True})(x).cls)


def test_lazy_handle_loads_nothing_until_called(empty_hf_cache):
    handle = TeacherHandle({"name": "dinov2_l", "weights": None}, lazy=True)
    assert not handle.loaded and handle.embed_dim == 1024
    with pytest.raises(TeacherWeightsNotFound):
        handle(images())
