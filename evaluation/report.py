"""The comparison table: one JSON per checkpoint, ``report.csv`` and ``report.md``.

A *result* is what ``evaluation.main`` writes to ``<run name>.json``: ``run``,
``checkpoint``, ``facts`` (family, latent shape, parameters, ...), ``rows`` (metrics,
one per token count), ``spectrum`` (DCT band energies of latents and images),
``code_counts``, ``conventions`` (how each metric was computed) and optionally
``generation`` (gFID). The table has one line per (checkpoint, token count).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

NOT_APPLICABLE = "n/a"


def _num(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NOT_APPLICABLE
    return f"{x:.{digits}f}"


def _per_codebook(values: list[float] | None, digits: int) -> str:
    if values is None:
        return NOT_APPLICABLE
    # tiny usages (a few codes of a 64k FSQ codebook) would print as 0.000
    return " / ".join(f"{v:.{digits}f}" if v == 0 or abs(v) >= 10**-digits else f"{v:.1e}" for v in values)


def _shape(shape) -> str:
    return NOT_APPLICABLE if shape is None else "x".join(str(s) for s in shape)


def _latent_hf(result: dict) -> float | None:
    latent = result["spectrum"].get("latent")
    return None if latent is None else latent["high_frequency_share"]


# (csv key, markdown header, value from (result, row), markdown formatter)
Column = tuple[str, str, Callable[[dict, dict], Any], Callable[[Any], str]]

COLUMNS: list[Column] = [
    ("run", "run", lambda r, row: r["run"], str),
    ("family", "family", lambda r, row: r["facts"]["family"], str),
    # released file / trained here, and which weights (EMA, raw, as released)
    ("source", "source", lambda r, row: _source(r), str),
    ("tokens", "tokens/img", lambda r, row: row["tokens_per_image"], str),
    ("bits_per_image", "bits/img", lambda r, row: row["bits_per_image"], lambda v: _num(v, 0)),
    ("latent_shape", "latent CxHxW", lambda r, row: _shape(r["facts"]["latent_shape"]), str),
    ("params_m", "params (M)", lambda r, row: r["facts"]["parameters"] / 1e6, lambda v: _num(v, 2)),
    ("rfid", "rFID", lambda r, row: row["rfid"], lambda v: _num(v, 2)),
    ("psnr", "PSNR", lambda r, row: row["psnr"], lambda v: _num(v, 2)),
    ("ssim", "SSIM", lambda r, row: row["ssim"], lambda v: _num(v, 3)),
    ("lpips", "LPIPS", lambda r, row: row["lpips"], lambda v: _num(v, 3)),
    ("codebook_usage", "usage", lambda r, row: row["codebook_usage"], lambda v: _per_codebook(v, 3)),
    ("perplexity", "perplexity", lambda r, row: row["perplexity"], lambda v: _per_codebook(v, 1)),
    ("latent_hf_share", "latent HF", lambda r, row: _latent_hf(r), lambda v: _num(v, 3)),
    ("image_hf_share", "image HF", lambda r, row: r["spectrum"]["images"]["high_frequency_share"], lambda v: _num(v, 3)),
    ("encode_images_per_s", "enc img/s", lambda r, row: row["encode_images_per_s"], lambda v: _num(v, 1)),
    ("decode_images_per_s", "dec img/s", lambda r, row: row["decode_images_per_s"], lambda v: _num(v, 1)),
    ("num_images", "images", lambda r, row: row["num_images"], str),
]

def _generation(key: str) -> Callable[[dict, dict], Any]:
    """A generation metric for a row: at the row's token count for 1D-token generators."""
    def get(r: dict, row: dict) -> Any:
        gen = r.get("generation") or {}
        if f"{key}_by_tokens" in gen:
            return gen[f"{key}_by_tokens"].get(str(row["tokens_per_image"]))
        return gen.get(key)
    return get


GENERATION_COLUMNS: list[Column] = [("gfid", "gFID", _generation("gfid"), lambda v: _num(v, 2)),
                                    ("inception_score", "IS", _generation("inception_score"), lambda v: _num(v, 1))]


def _source(result: dict) -> str:
    source = result.get("source") or {}
    kind = {"released": "released file", "trained": "trained here"}.get(source.get("kind"), "?")
    return f"{kind} ({source.get('weights', '?')})"


def columns_for(results: list[dict]) -> list[Column]:
    """The gFID / IS columns appear when at least one checkpoint has a generator evaluated."""
    cols = list(COLUMNS)
    if any(r.get("generation") for r in results):
        at = cols.index(next(c for c in cols if c[0] == "lpips")) + 1
        cols[at:at] = GENERATION_COLUMNS
    return cols


def _csv_value(v: Any) -> Any:
    if v is None:
        return NOT_APPLICABLE
    if isinstance(v, (list, tuple)):
        return "/".join(str(x) for x in v)
    return v


def table(results: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """(csv keys, raw values per line) over every (checkpoint, token count)."""
    cols = columns_for(results)
    lines = [[get(r, row) for _, _, get, _ in cols] for r in results for row in r["rows"]]
    return [c[0] for c in cols], lines


def shown_path(path: str | None) -> str | None:
    """A path as the report shows it: relative to the working directory (the repository root)
    when inside it, so a committed report holds no machine's absolute paths."""
    if not path or str(path).startswith("pretrained:"):
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def portable(result: dict) -> dict:
    """``result`` with its checkpoint paths as ``shown_path`` gives them."""
    result = dict(result)
    result["checkpoint"] = shown_path(result.get("checkpoint"))
    if isinstance(result.get("source"), dict) and result["source"].get("file"):
        result["source"] = {**result["source"], "file": shown_path(result["source"]["file"])}
    if isinstance(result.get("generation"), dict) and result["generation"].get("checkpoint"):
        result["generation"] = {**result["generation"], "checkpoint": shown_path(result["generation"]["checkpoint"])}
    return result


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(portable(result), indent=2, allow_nan=True))


def write_csv(results: list[dict], path: str | Path) -> None:
    keys, lines = table(results)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for line in lines:
            writer.writerow([_csv_value(v) for v in line])


def markdown_table(results: list[dict]) -> str:
    cols = columns_for(results)
    out = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results:
        for row in r["rows"]:
            out.append("| " + " | ".join(fmt(get(r, row)) for _, _, get, fmt in cols) + " |")
    return "\n".join(out)


def write_markdown(results: list[dict], path: str | Path, plots: dict[str, str], notes: list[str]) -> None:
    conventions = results[0]["conventions"] if results else {}
    lines = ["# Tokenizer comparison", "", markdown_table(results), ""]
    lines += ["## How the numbers were computed", ""]
    lines += [f"- **{k}**: {v}" for k, v in conventions.items()]
    lines += [f"- {n}" for n in notes]
    lines += ["", "## Checkpoints", ""]
    for r in map(portable, results):
        lines.append(f"- `{r['run']}`: {r['checkpoint']} ({r['facts']['family']}, "
                     f"{'discrete' if r['facts']['discrete'] else 'continuous'}, codebooks "
                     f"{r['facts']['codebook_sizes'] or NOT_APPLICABLE}, token grid {_shape(r['facts']['token_shape'])})")
        gen = r.get("generation")
        if gen:
            lines.append(f"  - generator {gen['checkpoint']} ({gen.get('family', '?')}): gFID {_num(gen['gfid'], 2)}, "
                         f"IS {_num(gen.get('inception_score'), 1)} ({gen['note']}) "
                         f"sampling: {gen['sampling']}; against {gen['reference']}")
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in plots.items()]
    Path(path).write_text("\n".join(lines) + "\n")
