"""Reading released weight files and loading them into the project's models, never silently
partial. Family modules (``llamagen``, ``fqgan``, ``vavae``, ``flextok``) describe their
releases with :class:`Release` and convert the reference layout (rename / reshape only)."""
from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    """One released tokenizer: how to build the project's model from the file(s) at ``path``."""

    name: str
    family: str  # the project family: VQGAN, FQGAN, AutoencoderKL, FlexTok
    files: tuple[str, ...]  # the released file name(s), as published
    published: str  # where to get them (URL or hub id)
    build: Callable[..., nn.Module]  # build(path: Path, **options) -> model with the weights, eval, fp32
    notes: str = ""
    options: Mapping[str, str] = field(default_factory=dict)  # option -> what it points to (for errors / docs)


class MissingReleaseError(FileNotFoundError):
    """A released weight file is not on disk (the build machines have no internet)."""


class StateDictMismatch(RuntimeError):
    """A state dict that does not fit the model: every missing, unexpected and mis-shaped key."""


def hf_cache_dirs() -> list[Path]:
    """Hugging Face hub cache roots, in the order the hub itself looks (offline: never downloads)."""
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    roots.append(Path("~/.cache/huggingface/hub").expanduser())
    return roots


def resolve_file(release: Release, path: str | os.PathLike | None, option: str = "path",
                 file: str | None = None, hub_id: str | None = None) -> Path:
    """Where the release is on disk. ``file``: the released file's name (None when the release
    is a model directory, e.g. a Hugging Face repo with ``config.json``).

    ``path`` may be the file itself, a directory holding it, or a Hugging Face cache entry
    (``.../models--org--name``, newest snapshot first); without ``path`` the local HF cache is
    searched for ``hub_id``. Never downloads. One error names the file, where it is
    published and the option that points to it."""
    file = file if file is not None else (release.files[0] if release.files else None)
    looked: list[str] = []

    def within(directory: Path) -> Path | None:
        snaps = (sorted((directory / "snapshots").glob("*"), key=lambda s: s.stat().st_mtime, reverse=True)
                 if (directory / "snapshots").is_dir() else [])
        for base in (snaps if snaps else [directory]):
            target = base / file if file else base
            looked.append(str(target))
            if (target.is_file() if file else target.is_dir()):
                return target
        return None

    if path is not None:
        p = Path(os.path.expanduser(str(path)))
        if p.is_file():
            return p
        found = within(p) if p.is_dir() else looked.append(str(p))
        if found:
            return found
    if hub_id:
        for root in hf_cache_dirs():
            entry = root / ("models--" + hub_id.replace("/", "--"))
            found = within(entry) if entry.is_dir() else looked.append(str(entry))
            if found:
                return found
    what = file or "the model directory"
    raise MissingReleaseError(
        f"Released weights for '{release.name}' not found: {what}.\n"
        f"Looked in: {', '.join(looked) if looked else f'{option}=None'}.\n"
        f"Published at: {release.published}\n"
        f"Fix: download {what} and pass {option}=/path/to/{file or 'model_dir'}"
        + (f" (or put it in the Hugging Face cache as {hub_id})" if hub_id else "") + "."
    )


def read_state_dict(path: str | os.PathLike, keys: Iterable[str] = ("ema", "model", "state_dict")) -> dict[str, Tensor]:
    """Tensors of a ``.pt``/``.ckpt``/``.bin`` or ``.safetensors`` file; for a checkpoint dict the
    first of ``keys`` present (in that order) is unwrapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in keys:
            if key in obj and isinstance(obj[key], Mapping):
                log.info("%s: using the state dict under '%s'.", path.name, key)
                return dict(obj[key])
        raise StateDictMismatch(f"{path}: no state dict under any of {list(keys)}; top-level keys: {list(obj)[:10]}")
    return dict(obj)


def load_exact(model: nn.Module, state: Mapping[str, Tensor], source: str,
               ignore: Callable[[str], bool] | None = None, optional: Callable[[str], bool] | None = None) -> list[str]:
    """Load ``state`` into ``model`` so that every parameter and buffer is set from the file.

    ``ignore(key)`` names file keys that are deliberately dropped (training-only heads);
    ``optional(key)`` names model keys the file may lack (running statistics the model
    re-creates). Anything else that does not fit raises :class:`StateDictMismatch` listing
    every missing, unexpected and mis-shaped key. Returns the ignored keys (to report)."""
    ignore = ignore or (lambda k: False)
    optional = optional or (lambda k: False)
    ignored = sorted(k for k in state if ignore(k))
    state = {k: v for k, v in state.items() if not ignore(k)}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not optional(k))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def part(title, items):
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "") if items else ""
        raise StateDictMismatch(
            f"{source} does not fit {type(model).__name__}:"
            + part("missing in the file", missing) + part("unexpected in the file", unexpected)
            + part("shape mismatch", shapes)
            + "\nFix: check the release name matches the file (e.g. ds16 vs ds8) and the options passed."
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    if ignored:
        log.info("%s: ignored %d training-only tensors (%s%s).", source, len(ignored), ", ".join(ignored[:6]),
                 " ..." if len(ignored) > 6 else "")
    return ignored


def conv_levels(keys, block: "re.Pattern[str]", res_kind: str) -> dict[tuple[str, int], tuple[int, bool]]:
    """(part, level) -> (number of res blocks, whether an attention follows each) of a taming/LDM
    style conv encoder/decoder state dict. ``block`` matches a level's block keys with groups
    ``part``, ``level``, ``kind`` (``res_kind`` or attention) and ``j``."""
    res, attn = defaultdict(set), defaultdict(set)
    for key in keys:
        m = block.match(key)
        if m:
            (res if m["kind"] == res_kind else attn)[(m["part"], int(m["level"]))].add(int(m["j"]))
    return {k: (len(res[k]), bool(attn.get(k))) for k in res}


def ready(model: nn.Module) -> nn.Module:
    """What ``load_pretrained`` returns: fp32, eval mode, no gradients needed."""
    return model.float().eval()


#: the project's tokenizer configs (``conf/tokenizer``): a release is built from the very config
#: a training run uses, so a parity test of the release also checks that config
CONF_TOKENIZER = Path(__file__).resolve().parents[2] / "conf" / "tokenizer"


def tokenizer_config(config: str, updates: Mapping[str, Any] | None = None):
    """``conf/tokenizer/<config>.yaml`` with ``updates`` merged in (an OmegaConf node)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_TOKENIZER / f"{config}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.create(dict(updates or {})))


def tokenizer_from_config(config: str, updates: Mapping[str, Any] | None = None):
    """Instantiate ``conf/tokenizer/<config>.yaml`` (a name) or an already loaded config node,
    with ``updates`` merged in."""
    from hydra.utils import instantiate

    cfg = tokenizer_config(config, updates) if isinstance(config, str) else config
    return instantiate(cfg)
