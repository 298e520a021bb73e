"""Released tokenizers from the papers' own files: ``load_pretrained(name, path, **options)``.

Each family module converts its reference layout into the project's model (rename and
reshape only) and describes its releases in a ``RELEASES`` dict; ``docs/pretrained.md``
lists them with where they are published and the parity each one was checked to.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from tokenizers.contract import Tokenizer
from tokenizers.pretrained.common import MissingReleaseError, Release, StateDictMismatch  # noqa: F401

#: family modules holding a ``RELEASES`` dict (missing ones are skipped until they exist)
FAMILY_MODULES = ("llamagen", "fqgan", "vavae", "flextok")


def releases() -> dict[str, Release]:
    found: dict[str, Release] = {}
    for module in FAMILY_MODULES:
        try:
            mod = importlib.import_module(f"tokenizers.pretrained.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"tokenizers.pretrained.{module}":
                raise
            continue
        found.update(getattr(mod, "RELEASES", {}))
    return found


def load_pretrained(name: str, path: str | os.PathLike | None = None, **options: Any) -> Tokenizer:
    """The project's own model for the released tokenizer ``name``, with its released weights,
    in eval mode and fp32. ``path``: the released file or model directory (a Hugging Face
    cache entry works too); ``options`` are the family's (e.g. ``vae=`` for FlexTok)."""
    table = releases()
    if name not in table:
        raise KeyError(f"Unknown released tokenizer {name!r}. Available: {', '.join(sorted(table)) or 'none'}.")
    model = table[name].build(path, **options)
    model.released_from = {"name": name, "path": None if path is None else str(path), "family": table[name].family}
    return model
