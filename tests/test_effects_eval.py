"""Numbers with known answers, and the weights each number is claimed to come from.

- the evaluator's PSNR on 8-bit pixels equals a hand-computed value (a reconstruction
  exactly k grey levels off), its SSIM equals an independent implementation of the
  stated definition and agrees with scikit-image;
- validation (``val/psnr``), the image grids and ``load_tokenizer(ema=True)`` use the EMA
  weights, which differ from the raw ones on purpose here;
- ``evaluate.py`` end to end: the report's PSNR is the EMA tokenizer's PSNR on the same
  images, computed here by hand.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from common.metrics import build_fid, psnr_per_image, ssim_per_image, to_pixels
from evaluation.runner import evaluate_tokenizer
from inprocess import ROOT, compose_train, images, tiny_module, trainer
from tokenizers.contract import Tokenizer


def pixel_grid_images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] whose pixels are exact 8-bit levels in [20, 235] (room to shift)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(20, 236, (n, 3, size, size), generator=g).double()
    return (levels / 127.5 - 1).float()


class ShiftTokenizer(Tokenizer):
    """Continuous identity tokenizer whose decode adds ``shift`` grey levels (of 255) to
    every pixel: the reconstruction error is known exactly."""

    discrete = False

    def __init__(self, shift_levels: float):
        super().__init__()
        self.shift = shift_levels / 127.5

    def encode(self, x):
        return x

    def decode(self, z, **options):
        return z + self.shift

    def encode_latents(self, x):
        return x

    def decode_latents(self, z):
        return z + self.shift

    def token_shape(self, image_size):
        return (image_size, image_size)

    def latent_shape(self, image_size):
        return (3, image_size, image_size)


class MeanAbs(torch.nn.Module):
    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(1)


def _evaluate(tokenizer, batches):
    result = evaluate_tokenizer(tokenizer, batches, lpips=MeanAbs(), make_fid=lambda: build_fid(random_features=True))
    return result["rows"][0]


@pytest.mark.parametrize("shift,levels", [(3.0, 3), (2.6, 3), (-7.2, 7)])
def test_evaluator_psnr_is_computed_on_rounded_8bit_pixels(shift, levels):
    # every pixel ends `levels` grey levels off after rounding: MSE = levels^2 on [0, 255]
    x = pixel_grid_images()
    row = _evaluate(ShiftTokenizer(shift), [(x, torch.zeros(len(x), dtype=torch.long))])
    expected = 10 * math.log10(255.0**2 / levels**2)
    assert row["psnr"] == pytest.approx(expected, abs=1e-9)
    assert row["num_images"] == 4


def _ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM as the evaluator states it (Wang et al.: 11-tap Gaussian, sigma 1.5, K1 0.01,
    K2 0.03, data range 255) with torchmetrics' border handling (reflect padding, the map
    averaged over every pixel), written independently with scipy."""
    k = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    k /= k.sum()

    def blur(z):
        return correlate1d(correlate1d(z, k, axis=-2, mode="mirror"), k, axis=-1, mode="mirror")

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())


def test_evaluator_ssim_matches_an_independent_implementation_and_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    target = pixel_grid_images(n=3, size=32)
    noise = torch.tensor([4.0, 20.0, 60.0]).view(3, 1, 1, 1) / 127.5
    recon = (target + noise * torch.randn(target.shape, generator=g)).clamp(-1, 1)
    row = _evaluate(ShiftTokenizer(0.0), [(target, torch.zeros(3, dtype=torch.long))])
    assert row["ssim"] == pytest.approx(1.0, abs=1e-12)  # exact reconstruction

    class Noisy(ShiftTokenizer):
        def decode(self, z, **options):
            return recon

    row = _evaluate(Noisy(0.0), [(target, torch.zeros(3, dtype=torch.long))])
    p, t = to_pixels(recon).numpy(), to_pixels(target).numpy()
    by_hand = [_ssim_by_hand(p[i], t[i]) for i in range(3)]
    assert row["ssim"] == pytest.approx(float(np.mean(by_hand)), abs=1e-9)
    assert ssim_per_image(to_pixels(recon), to_pixels(target)).tolist() == pytest.approx(by_hand, abs=1e-9)
    reference = [structural_similarity(t[i], p[i], data_range=255, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False) for i in range(3)]
    # scikit-image leaves out a 5-pixel border; the values agree to about 1 %
    assert by_hand == pytest.approx(reference, abs=0.01)
    assert max(by_hand) < 0.999 and min(by_hand) < 0.75  # lossy inputs: away from the perfect score


def test_split_psnr_and_ssim_average_per_image_values_over_batches():
    x = pixel_grid_images(n=4)
    batches = [(x[:2], torch.zeros(2, dtype=torch.long)), (x[2:], torch.zeros(2, dtype=torch.long))]

    class PerImageShift(ShiftTokenizer):
        def decode(self, z, **options):  # image i of a batch is i + 1 grey levels off
            return z + torch.arange(1, len(z) + 1).view(-1, 1, 1, 1) / 127.5

    row = _evaluate(PerImageShift(0.0), batches)
    expected = np.mean([10 * math.log10(255.0**2 / k**2) for k in (1, 2, 1, 2)])
    assert row["psnr"] == pytest.approx(expected, abs=1e-9)
    assert row["num_images"] == 4


# -- the weights behind each number ------------------------------------------------------------
def _module_with_distinct_ema():
    """A tiny module whose EMA copy differs from the raw tokenizer on purpose."""
    module = tiny_module(seed=0)
    with torch.no_grad():
        module.ema.module.decoder.conv_out.bias.add_(0.3)
    return module


def _psnr_of(tokenizer, x):
    with torch.no_grad():
        rec = tokenizer(x).reconstruction
    return float(psnr_per_image(to_pixels(rec), to_pixels(x)).mean())


def test_validation_psnr_comes_from_the_ema_weights():
    from torch.utils.data import DataLoader, TensorDataset

    module = _module_with_distinct_ema()
    x = images(4, 16)
    ema_psnr, raw_psnr = _psnr_of(module.ema.module.eval(), x), _psnr_of(module.tokenizer.eval(), x)
    assert abs(ema_psnr - raw_psnr) > 0.5
    loader = DataLoader(TensorDataset(x, torch.zeros(4, dtype=torch.long)), batch_size=4)
    metrics = trainer(1, limit_val_batches=None).validate(module, dataloaders=loader, verbose=False)[0]
    assert metrics["val/psnr"] == pytest.approx(ema_psnr, abs=1e-4)


def test_validation_leaves_out_the_padding_rows():
    """Rows labelled PADDING_LABEL (-1) keep ranks in step; they are not images of the split."""
    from torch.utils.data import DataLoader, TensorDataset

    module = _module_with_distinct_ema()
    x = images(4, 16)
    real_psnr = _psnr_of(module.ema.module.eval(), x[:2])
    padded = torch.cat([x[:2], torch.zeros(2, 3, 16, 16)])
    labels = torch.tensor([0, 0, -1, -1])
    loader = DataLoader(TensorDataset(padded, labels), batch_size=4)
    metrics = trainer(1, limit_val_batches=None).validate(module, dataloaders=loader, verbose=False)[0]
    assert metrics["val/psnr"] == pytest.approx(real_psnr, abs=1e-4)


def test_image_grids_show_ema_reconstructions():
    from torchvision.utils import make_grid

    from training.callbacks import ReconstructionGrid, to_unit

    module = _module_with_distinct_ema().eval()
    x = images(2, 16)
    grid = ReconstructionGrid(dirpath="unused", num_images=2)._grid(module, x)
    with torch.no_grad():
        ema_rows = torch.cat([x, module.ema.module(x).reconstruction])
    assert torch.equal(grid, make_grid(to_unit(ema_rows), nrow=2, padding=2))


def _save_checkpoint(module, path, cfg_dict):
    torch.save({"state_dict": module.state_dict(), "config": cfg_dict, "global_step": 0}, path)


def test_load_tokenizer_gives_the_ema_weights_or_the_raw_ones(tmp_path):
    from tokenizers.loading import load_tokenizer

    cfg = compose_train(tmp_path, ["debug=smoke", "loss.perceptual=null", "logger=none"])
    from training.run import build_module

    module = build_module(cfg)
    with torch.no_grad():
        module.ema.module.decoder.conv_out.bias.add_(0.3)
    path = tmp_path / "last.ckpt"
    _save_checkpoint(module, path, module.run_config)
    ema, _ = load_tokenizer(path, ema=True)
    raw, _ = load_tokenizer(path, ema=False)
    assert torch.equal(ema.decoder.conv_out.bias, module.ema.module.decoder.conv_out.bias)
    assert torch.equal(raw.decoder.conv_out.bias, module.tokenizer.decoder.conv_out.bias)
    assert not torch.equal(ema.decoder.conv_out.bias, raw.decoder.conv_out.bias)


def test_evaluate_py_reports_the_psnr_of_the_ema_weights(tmp_path, monkeypatch):
    """The one end-to-end run of evaluate.py in the fast suite: a checkpoint written here
    (EMA != raw on purpose), the real entry point in a subprocess, the report's numbers
    checked against PSNRs computed here on the same synthetic images."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from data.splits import validation_batches
    from tokenizers.loading import load_tokenizer
    from training.run import build_module

    cfg = compose_train(tmp_path / "train", ["debug=smoke", "loss.perceptual=null", "logger=none",
                                             "run_name=vq_ema_test"])
    module = build_module(cfg)
    with torch.no_grad():
        module.ema.module.decoder.conv_out.bias.add_(0.3)
    ckpt = tmp_path / "last.ckpt"
    _save_checkpoint(module, ckpt, module.run_config)

    out = tmp_path / "report"
    args = [f"checkpoints=[{ckpt}]", f"out={out}", "debug=smoke", f"hydra.run.dir={tmp_path / 'eval'}"]
    proc = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((out / "vq_ema_test.json").read_text())["rows"]
    assert {"report.md", "report.csv", "reconstructions.png"} <= {p.name for p in out.iterdir()}

    # the images evaluate.py read: its own composed data config, its limit_batches
    monkeypatch.chdir(ROOT)  # conf/evaluate finds the shared groups through file://conf
    with initialize_config_dir(str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=args[:3])
    x = torch.cat([b[0] for b in validation_batches(instantiate(eval_cfg.data), eval_cfg.limit_batches)])
    assert row["num_images"] == len(x) == 8
    ema, _ = load_tokenizer(ckpt, ema=True)
    raw, _ = load_tokenizer(ckpt, ema=False)
    with torch.no_grad():
        ema_psnr = float(psnr_per_image(to_pixels(ema.decode(ema.encode(x))), to_pixels(x)).mean())
        raw_psnr = float(psnr_per_image(to_pixels(raw.decode(raw.encode(x))), to_pixels(x)).mean())
    assert abs(ema_psnr - raw_psnr) > 0.5
    assert row["psnr"] == pytest.approx(ema_psnr, abs=1e-6)
