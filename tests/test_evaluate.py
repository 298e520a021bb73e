"""Claims about the evaluation pass, the report and evaluate.py (evaluation/, evaluate.py)."""
import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from data.synthetic import SyntheticDataModule
from evaluation import plots, report
from data.splits import first_images, validation_batches
from common.metrics import build_fid
from evaluation.runner import EvalSettings, evaluate_tokenizer, reconstruct, resolve_token_counts
from tokenizers.contract import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


class PaletteTokenizer(Tokenizer):
    """Hand-made discrete tokenizer: each pixel's RGB quantised to ``levels`` values per
    channel, one code per pixel (codebook ``levels ** 3``). Exact and parameter-free."""

    discrete = True

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels
        self.codebook_sizes = (levels**3,)
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)  # one parameter to count

    def _digits(self, images: Tensor) -> Tensor:
        return ((images.clamp(-1, 1) + 1) / 2 * (self.levels - 1)).round().long()

    def encode(self, images: Tensor) -> Tensor:
        d = self._digits(images)
        return (d[:, 0] * self.levels + d[:, 1]) * self.levels + d[:, 2]

    def _to_digits(self, tokens: Tensor) -> Tensor:
        l = self.levels
        return torch.stack([tokens // (l * l), (tokens // l) % l, tokens % l], 1)

    def decode(self, tokens: Tensor, **options) -> Tensor:
        return self._to_digits(tokens).float() / (self.levels - 1) * 2 - 1

    def encode_latents(self, images: Tensor) -> Tensor:
        return self._digits(images).float()

    def decode_latents(self, latents: Tensor) -> Tensor:
        return latents / (self.levels - 1) * 2 - 1

    def token_shape(self, image_size: int):
        return (image_size, image_size)

    def latent_shape(self, image_size: int):
        return (3, image_size, image_size)


class PrefixPaletteTokenizer(PaletteTokenizer):
    """The palette codes as a 1D sequence (B, H*W) decodable from any prefix; the pixels of
    dropped tokens come back mid-grey (a stand-in for FlexTok's prefix decoding)."""

    def encode(self, images: Tensor) -> Tensor:
        return super().encode(images).flatten(1)

    def decode(self, tokens: Tensor, num_tokens: int | None = None, **options) -> Tensor:
        b, n = tokens.shape
        side = math.isqrt(n)
        images = super().decode(tokens.reshape(b, side, side))
        if num_tokens is not None:
            keep = (torch.arange(n) < num_tokens).reshape(1, 1, side, side)
            images = torch.where(keep, images, torch.zeros_like(images))
        return images

    def token_shape(self, image_size: int):
        return (image_size * image_size,)


class ScaledIdentity(Tokenizer):
    """Hand-made continuous tokenizer: latent = image / 2 on a 2x coarser grid."""

    discrete = False

    def encode(self, images):
        return self.encode_latents(images)

    def decode(self, tokens, **options):
        return self.decode_latents(tokens)

    def encode_latents(self, images):
        return torch.nn.functional.avg_pool2d(images, 2) / 2

    def decode_latents(self, latents):
        return torch.nn.functional.interpolate(latents * 2, scale_factor=2, mode="nearest")

    def token_shape(self, image_size):
        return (image_size // 2, image_size // 2)

    def latent_shape(self, image_size):
        return (3, image_size // 2, image_size // 2)


def synthetic_batches(num_val=10, batch_size=4, rank=None, world_size=None):
    dm = SyntheticDataModule(resolution=16, batch_size=batch_size, num_val=num_val, num_train=8,
                             val_remainder="pad", rank=rank, world_size=world_size)
    return dm


class PixelDistance(torch.nn.Module):
    """Cheap per-image perceptual stand-in (mean |x - y| of 2x2-pooled images) for tests of
    the pass itself; the real LPIPS is checked in test_metrics.py and the slow evaluate.py test."""

    def forward(self, x, y):
        return (torch.nn.functional.avg_pool2d(x - y, 2)).abs().flatten(1).mean(1)


@pytest.fixture(scope="module")
def lpips():
    return PixelDistance()


def make_fid():
    return build_fid(random_features=True)


def test_a_lossless_palette_tokenizer_scores_perfectly_and_uses_exactly_its_codes(lpips):
    # images already on the 4-level palette: reconstruction is exact
    dm = synthetic_batches()
    batches = [(PaletteTokenizer().decode(PaletteTokenizer().encode(x)), y) for x, y in validation_batches(dm)]
    result = evaluate_tokenizer(PaletteTokenizer(), batches, lpips=lpips, make_fid=make_fid)
    (row,) = result["rows"]
    assert row["num_images"] == 10
    assert row["psnr"] > 140 and row["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert row["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert row["rfid"] == pytest.approx(0.0, abs=1e-3)
    expected_codes = torch.unique(torch.cat([PaletteTokenizer().encode(x).flatten() for x, _ in batches]))
    assert row["codebook_usage"] == [pytest.approx(expected_codes.numel() / 64)]
    counts = torch.tensor(result["code_counts"][row["num_tokens"]][0])
    assert int(counts.sum()) == 10 * 16 * 16
    assert row["bits_per_image"] == 16 * 16 * 6
    assert result["facts"]["parameters"] == 1


def test_padding_rows_of_the_last_batch_are_not_counted(lpips):
    dm = synthetic_batches(num_val=6, batch_size=4, rank=1, world_size=2)  # 3 real + 1 padding on rank 1
    result = evaluate_tokenizer(PaletteTokenizer(), validation_batches(dm), lpips=lpips, make_fid=make_fid)
    assert result["rows"][0]["num_images"] == 3


def test_prefix_decodable_tokenizers_get_one_row_per_token_count(lpips):
    tok = PrefixPaletteTokenizer()
    assert resolve_token_counts(tok, 16, [1, 64, 1000]) == [1, 64, 256]
    result = evaluate_tokenizer(tok, validation_batches(synthetic_batches()), lpips=lpips, make_fid=make_fid,
                                settings=EvalSettings(token_counts=[16, 64]))
    rows = result["rows"]
    assert [r["num_tokens"] for r in rows] == [16, 64, 256]
    assert [r["bits_per_image"] for r in rows] == [16 * 6, 64 * 6, 256 * 6]
    assert rows[0]["psnr"] < rows[1]["psnr"] < rows[2]["psnr"]  # more tokens, better reconstruction
    assert rows[0]["codebook_usage"][0] <= rows[2]["codebook_usage"][0]


def test_continuous_tokenizers_have_no_usage_or_bits(lpips):
    result = evaluate_tokenizer(ScaledIdentity(), validation_batches(synthetic_batches()), lpips=lpips,
                                make_fid=make_fid)
    row = result["rows"][0]
    assert row["codebook_usage"] is None and row["bits_per_image"] is None
    assert result["facts"]["latent_shape"] == [3, 8, 8] == result["facts"]["latent_shape_measured"]
    assert 0 <= result["spectrum"]["latent"]["high_frequency_share"] <= 1
    assert sum(result["spectrum"]["images"]["bands"]) == pytest.approx(1.0, abs=1e-6)


# -- ranks ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_on_rank(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = _evaluate_both_tokenizers()
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _evaluate_both_tokenizers() -> dict:
    lp = PixelDistance()  # a per-image stand-in: VGG16 construction on each rank costs more than the test
    # 7 images in batches of 2: rank 0 gets 4, rank 1 gets 3 and a padding row
    dm = synthetic_batches(num_val=7, batch_size=2)
    res = evaluate_tokenizer(PrefixPaletteTokenizer(levels=3), validation_batches(dm), lpips=lp, make_fid=make_fid,
                             settings=EvalSettings(token_counts=[8]))
    return {"rows": res["rows"], "spectrum": res["spectrum"], "code_counts": res["code_counts"]}


def _assert_same_numbers(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if "images_per_s" not in str(k):  # timings differ by nature
                _assert_same_numbers(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_numbers(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-7, abs=1e-9), path
    else:
        assert a == b, path


def test_two_cpu_ranks_give_the_numbers_of_one(tmp_path):
    single = json.loads(json.dumps(_evaluate_both_tokenizers()))  # JSON round trip like the ranks' file
    out = tmp_path / "ranks.json"
    mp.spawn(_evaluate_on_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    assert [r["num_images"] for r in two["rows"]] == [7, 7]
    _assert_same_numbers(single, two)


# -- report --------------------------------------------------------------------------------
def _result(run, tokenizer, batches, lpips, settings=None):
    res = evaluate_tokenizer(tokenizer, batches, lpips=lpips, make_fid=make_fid, settings=settings)
    return {"run": run, "checkpoint": f"/ckpt/{run}.ckpt", **res,
            "conventions": {"rFID": "smoke", "LPIPS": "smoke"}, "tokenizer_target": "x"}


def test_report_files_have_every_column_filled_for_discrete_continuous_and_prefix_tokenizers(tmp_path, lpips):
    dm = synthetic_batches()
    results = [
        _result("palette", PaletteTokenizer(), validation_batches(dm), lpips),
        _result("prefix", PrefixPaletteTokenizer(), validation_batches(dm), lpips, EvalSettings(token_counts=[4])),
        _result("identity", ScaledIdentity(), validation_batches(dm), lpips),
    ]
    results = json.loads(json.dumps(results))  # as read back from <run>.json
    report.write_csv(results, tmp_path / "report.csv")
    report.write_markdown(results, tmp_path / "report.md", {"grid": "grid.png"}, ["note"])
    with open(tmp_path / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["palette", "prefix", "prefix", "identity"]
    assert all(v not in ("", None) for r in rows for v in r.values())
    assert rows[3]["codebook_usage"] == report.NOT_APPLICABLE  # continuous: stated, not blank
    table_lines = [l for l in (tmp_path / "report.md").read_text().splitlines() if l.startswith("| ")]
    assert len(table_lines) == 1 + 4 and all("|  |" not in l for l in table_lines)

    inputs = first_images(validation_batches(dm), 3)
    recon = [("palette", reconstruct(PaletteTokenizer(), inputs, [None])[None])]
    plots.reconstruction_grid(inputs, recon, tmp_path / "grid.png")
    plots.rate_distortion(results, tmp_path / "rd.png")
    plots.spectra(results, tmp_path / "spectra.png")
    assert plots.codebook_usage(results, tmp_path / "usage.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("grid.png", "rd.png", "spectra.png", "usage.png"))


# -- the entry point -------------------------------------------------------------------------
def _train_smoke(tokenizer: str, run_dir: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "train.py", "debug=smoke", f"tokenizer={tokenizer}", "trainer.max_steps=2",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_evaluate_py_from_two_smoke_checkpoints_of_different_families_writes_every_file(tmp_path):
    vq = _train_smoke("vqgan", tmp_path / "vq")
    vae = _train_smoke("vae", tmp_path / "vae")
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", f"checkpoints=[{vq},{tmp_path / 'vae'}]", f"out={out}", "debug=smoke",
         f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {"vqgan.json", "vae.json", "report.md", "report.csv", "reconstructions.png", "rate_distortion.png",
             "spectra.png", "codebook_usage.png"}
    assert names <= {p.name for p in out.iterdir()}
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["family"] for r in rows] == ["VQGAN", "AutoencoderKL"]
    assert all(v not in ("", None) for r in rows for v in r.values())
    assert "SMOKE" in (out / "report.md").read_text()
