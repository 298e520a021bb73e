"""PNG figures of the comparison report (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _finish(fig, path: str | Path, note: str | None) -> None:
    """Save and close; ``note`` (e.g. random feature networks under debug=smoke) is written
    on the figure itself, so the picture cannot be mistaken for a result when seen alone."""
    if note:
        fig.subplots_adjust(bottom=0.2)
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=9, color="red", wrap=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(result: dict, row: dict | None = None) -> str:
    if row is not None and result["facts"].get("variable_length"):
        return f"{result['run']} ({row['num_tokens']} tok)"
    return result["run"]


def reconstruction_grid(inputs: torch.Tensor, reconstructions: list[tuple[str, torch.Tensor]], path: str | Path,
                        note: str | None = None) -> None:
    """Rows: the inputs, then each tokenizer's reconstruction of the same inputs."""
    image_rows([("input", inputs)] + list(reconstructions), path, note)


def image_rows(rows: list[tuple[str, torch.Tensor]], path: str | Path, note: str | None = None) -> None:
    """One labelled row of images in [-1, 1] per entry (same count per row)."""
    n = max(images.shape[0] for _, images in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 1.6, 1.3 * len(rows)), squeeze=False)
    for i, (name, images) in enumerate(rows):
        pictures = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        for j in range(n):
            ax = axes[i][j]
            if j < len(pictures):
                ax.imshow(pictures[j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    _finish(fig, path, note)


def rate_distortion(results: list[dict], path: str | Path, note: str | None = None) -> None:
    """Bits per image against PSNR and rFID; continuous tokenizers (no bit count) are
    drawn as horizontal dashed lines."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "rfid", "rFID")):
        for i, r in enumerate(results):
            rows, color = r["rows"], f"C{i % 10}"
            if r["facts"]["discrete"]:
                xs = [row["bits_per_image"] for row in rows]
                ys = [row[key] for row in rows]
                ax.plot(xs, ys, marker="o", label=r["run"], color=color)
            else:
                for row in rows:
                    ax.axhline(row[key], linestyle="--", linewidth=1, label=f"{r['run']} (continuous)", color=color)
        ax.set_xlabel("bits per image")
        ax.set_ylabel(name)
        if any(r["facts"]["discrete"] and len(r["rows"]) > 1 for r in results):
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _finish(fig, path, note)


def spectra(results: list[dict], path: str | Path, note: str | None = None) -> None:
    """Fraction of DCT energy per radial band of each tokenizer's latents, images as reference."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if results:
        bands = results[0]["spectrum"]["images"]["bands"]
        ax.plot(np.arange(len(bands)), bands, "k--", linewidth=2,
                label=f"RGB images (HF {results[0]['spectrum']['images']['high_frequency_share']:.3f})")
    for r in results:
        latent = r["spectrum"].get("latent")
        if latent is None:  # no spatial latent (FlexTok)
            continue
        ax.plot(np.arange(len(latent["bands"])), latent["bands"], marker="o",
                label=f"{r['run']} latent (HF {latent['high_frequency_share']:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("radial DCT band (low -> high frequency)")
    ax.set_ylabel("fraction of energy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _finish(fig, path, note)


def codebook_usage(results: list[dict], path: str | Path, note: str | None = None) -> bool:
    """Per codebook: code frequencies sorted from most to least used (a flat curve is an
    evenly used codebook; the drop to zero marks dead codes). False when nothing is discrete."""
    panels = []
    for r in results:
        if not r["code_counts"]:
            continue
        full = max(r["code_counts"], key=lambda k: int(k))  # the full-length row of variable-length tokenizers
        for i, counts in enumerate(r["code_counts"][full]):
            row = next(row for row in r["rows"] if str(row["num_tokens"]) == str(full))
            title = f"{r['run']} codebook {i}" if len(r["code_counts"][full]) > 1 else r["run"]
            panels.append((title, np.asarray(counts, dtype=np.float64), row["codebook_usage"][i], row["perplexity"][i]))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, counts, usage, perplexity) in zip(axes[0], panels):
        freq = np.sort(counts)[::-1] / max(counts.sum(), 1)
        # a filled step curve, not bars: 16k-64k codes would be 16k-64k patches
        ax.fill_between(np.arange(len(freq)), freq, step="post", alpha=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{title}\nusage {usage:.3f}, perplexity {perplexity:.1f} / {len(freq)}", fontsize=8)
        ax.set_xlabel("codes, most to least used")
        ax.set_ylabel("frequency")
    fig.tight_layout()
    _finish(fig, path, note)
    return True
