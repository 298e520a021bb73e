"""One way to name a tokenizer to rebuild: a run of this framework or a released checkpoint.

Accepted wherever a tokenizer checkpoint is (``evaluate.py checkpoints=``, ``train.py
init_from=``, ``generator.tokenizer_ckpt=``):

- a ``.ckpt`` file or a run directory (its ``checkpoints/last.ckpt``), rebuilt from the run
  config saved in it, with its EMA weights by default;
- ``pretrained:<name>:<path>`` (or ``pretrained:<name>=<path>``, which Hydra needs quoted),
  optionally followed by ``?<option>:<value>`` for each family option, e.g.
  ``pretrained:flextok_d18_d28:/w/flextok_d18_d28?vae:/w/flextok_vae_c16``
  (``tokenizers.pretrained``; names in ``docs/pretrained.md``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.checkpoints import find_checkpoint, load_checkpoint

PREFIX = "pretrained:"


@dataclass(frozen=True)
class ReleasedSpec:
    name: str
    path: str | None
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return PREFIX + self.name + (f":{self.path}" if self.path else "") + "".join(
            f"?{k}:{v}" for k, v in self.options.items())


def parse_released(spec: str) -> ReleasedSpec | None:
    """``pretrained:<name>[:|=]<path>[?<option>[:|=]<value>]...`` -> its parts; None for other specs."""
    spec = str(spec)
    if not spec.startswith(PREFIX):
        return None
    head, *opts = spec[len(PREFIX):].split("?")
    name, path = re.match(r"([^:=]*)(?:[:=](.*))?$", head).groups()
    options = {}
    for opt in opts:
        key, _, value = re.split(r"([:=])", opt, maxsplit=1) if re.search(r"[:=]", opt) else (opt, "", "")
        if not key or not value:
            raise ValueError(f"{spec}: option {opt!r} must read <option>:<value> (e.g. ?vae:/weights/flextok_vae_c16).")
        options[key] = value
    if not name:
        raise ValueError(f"{spec}: no release name. Fix: pretrained:<name>:<path>, e.g. pretrained:llamagen_vq16:/w/vq_ds16_c2i.pt")
    return ReleasedSpec(name=name, path=path or None, options=options)


def is_released(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def resolve_spec(spec: str, key: str = "checkpoint") -> str:
    """A released spec unchanged, or the absolute ``.ckpt`` file of a run spec (errors name ``key``)."""
    if is_released(spec):
        parse_released(spec)
        return str(spec)
    return str(Path(find_checkpoint(spec, key)).resolve())


def load_tokenizer(spec: str | os.PathLike, ema: bool = True, overrides: dict | None = None) -> tuple[Any, DictConfig]:
    """Rebuild a tokenizer: ``(tokenizer in eval mode, config)``.

    For a run, ``config`` is the run config saved in the checkpoint and the weights are its
    EMA weights (``ema=True``, what validation used) or the raw training weights. For a
    released checkpoint it is a small config naming the release. Either way
    ``config.source`` says where the weights came from (``kind``: trained / released,
    ``file``, ``weights``: EMA / raw / released)."""
    released = parse_released(str(spec))
    if released is not None:
        from tokenizers.pretrained import load_pretrained

        tokenizer = load_pretrained(released.name, released.path, **released.options)
        cfg = OmegaConf.create({
            "run_name": released.name,
            "tokenizer": {"_target_": "tokenizers.pretrained.load_pretrained", "name": released.name,
                          "path": released.path, **released.options},
            "source": {"kind": "released", "file": released.path, "weights": "released"},
        })
        return tokenizer.eval(), cfg

    from hydra.utils import instantiate

    path = find_checkpoint(spec, "checkpoint")
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise KeyError(f"{path} has no saved run config; it was not written by this framework's train.py.")
    cfg = OmegaConf.create(ckpt["config"])
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    tok_cfg = cfg.tokenizer.copy()
    if "load_teachers" in tok_cfg:
        tok_cfg.load_teachers = False  # encode/decode never need the teachers' weights
    tokenizer = instantiate(tok_cfg)
    state = ckpt["state_dict"]
    has_ema = any(k.startswith("ema.module.") for k in state)
    prefix = "ema.module." if ema and has_ema else "tokenizer."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = tokenizer.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not _rebuilt_elsewhere(m)]
    if unexpected or missing:
        raise RuntimeError(f"{path}: weights do not match the saved config. missing={missing[:5]} unexpected={unexpected[:5]}")
    tokenizer.eval()
    cfg.source = {"kind": "trained", "file": str(path), "weights": "EMA" if prefix == "ema.module." else "raw"}
    return tokenizer, cfg


def _rebuilt_elsewhere(key: str) -> bool:
    # training-time trackers, and frozen networks loaded from their own weight files
    return key.endswith(("recent_indices", "recent_pos"))
