"""Claims of tokenizers/loading.py and tokenizers/pretrained/common.py: how a tokenizer is
named, where released files are looked for, and that a partial load is never silent."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenizers.loading import is_released, parse_released
from tokenizers.pretrained import load_pretrained
from tokenizers.pretrained.common import (
    MissingReleaseError,
    Release,
    StateDictMismatch,
    load_exact,
    read_state_dict,
    resolve_file,
)

RELEASE = Release(name="toy", family="VQGAN", files=("toy.pt",), published="https://example.org/toy.pt",
                  build=lambda path, **kw: nn.Linear(2, 2))


@pytest.mark.parametrize("spec, name, path, options", [
    ("pretrained:llamagen_vq16:/w/vq_ds16_c2i.pt", "llamagen_vq16", "/w/vq_ds16_c2i.pt", {}),
    ("pretrained:llamagen_vq16=/w/vq_ds16_c2i.pt", "llamagen_vq16", "/w/vq_ds16_c2i.pt", {}),
    ("pretrained:flextok_d18_d28:/w/d?vae:/w/vae_c16", "flextok_d18_d28", "/w/d", {"vae": "/w/vae_c16"}),
    ("pretrained:vavae_f16d32", "vavae_f16d32", None, {}),
])
def test_released_spec_parses_name_path_and_options(spec, name, path, options):
    parsed = parse_released(spec)
    assert (parsed.name, parsed.path, parsed.options) == (name, path, options)
    assert parse_released(str(parsed)) == parsed  # round trip


def test_run_paths_are_not_released_specs():
    assert parse_released("logs/train/runs/x") is None and not is_released("logs/x/last.ckpt")


def test_missing_release_names_file_source_and_option(tmp_path):
    with pytest.raises(MissingReleaseError) as error:
        resolve_file(RELEASE, tmp_path / "nowhere", option="pretrained path", hub_id="org/toy")
    message = str(error.value)
    assert "toy.pt" in message and "https://example.org/toy.pt" in message and "pretrained path=" in message


def test_release_found_in_a_directory_and_in_a_hugging_face_cache_entry(tmp_path, monkeypatch):
    (tmp_path / "toy.pt").write_bytes(b"x")
    assert resolve_file(RELEASE, tmp_path) == tmp_path / "toy.pt"
    hub = tmp_path / "hub"
    snap = hub / "models--org--toy" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "toy.pt").write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_file(RELEASE, None, hub_id="org/toy") == snap / "toy.pt"
    assert resolve_file(RELEASE, hub / "models--org--toy") == snap / "toy.pt"


def test_state_dict_is_unwrapped_from_the_first_named_key(tmp_path):
    ema, model = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    torch.save({"model": model, "ema": ema, "optimizer": {}}, tmp_path / "a.pt")
    assert torch.equal(read_state_dict(tmp_path / "a.pt", keys=("ema", "model"))["w"], ema["w"])
    assert torch.equal(read_state_dict(tmp_path / "a.pt", keys=("model",))["w"], model["w"])


def test_partial_load_raises_with_every_kind_of_mismatch():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = dict(model.state_dict())
    state.pop("1.bias")
    state["0.weight"] = torch.zeros(5, 3)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatch) as error:
        load_exact(model, state, "toy.pt")
    message = str(error.value)
    assert "1.bias" in message and "extra.weight" in message and "(5, 3)" in message


def test_exact_load_sets_every_tensor_and_reports_ignored_heads():
    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    state = {**source.state_dict(), "head.weight": torch.zeros(1)}
    ignored = load_exact(target, state, "toy.pt", ignore=lambda k: k.startswith("head."))
    assert ignored == ["head.weight"]
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_unknown_release_lists_the_available_names():
    with pytest.raises(KeyError, match="Available"):
        load_pretrained("no_such_tokenizer")


def test_a_shape_mismatch_alone_is_refused_by_name_and_loads_nothing():
    """Same keys, one tensor of another shape (e.g. a ds8 codebook size in a ds16 model):
    one StateDictMismatch naming it, and the model keeps its weights."""
    model = nn.Linear(3, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"weight": torch.zeros(5, 3), "bias": torch.zeros(4)}
    with pytest.raises(StateDictMismatch, match=r"weight: file \(5, 3\) vs model \(4, 3\)"):
        load_exact(model, state, "toy.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
