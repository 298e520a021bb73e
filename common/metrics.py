"""Metrics of the evaluator (SPEC.md §8, PITFALLS.md "Metrics").

Conventions, stated once here and repeated in every report:
- images arrive in [-1, 1]; PSNR and SSIM are computed on [0, 255] pixel values rounded
  to integers (what a saved 8-bit PNG holds), PSNR as the mean of per-image values;
- rFID / gFID use torchmetrics' ``FrechetInceptionDistance`` on uint8 images with the
  TF1-compatible bilinear resize to 299 px (``antialias=False``: torch-fidelity's
  ``interpolate_bilinear_2d_like_tensorflow1x``, the resize of the published numbers),
  2048-d pool features, statistics and the Fréchet distance in float64;
- codebook usage is the fraction of codes that occur at least once over the whole split
  (summed across ranks), perplexity ``exp(entropy of code frequencies)``, per codebook.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from common.distributed import all_reduce_sum, reduce_device

#: torch-fidelity's Inception-v3 port of the 2015-12-05 TF graph (what FID papers use).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
FID_RESIZE = "TF1-compatible bilinear resize to 299x299 (torch-fidelity, antialias=False)"


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights a metric needs are not on disk (no downloads on the build machines).

    ``tokenizers.perceptual`` raises its own class of the same name for LPIPS; catch
    ``FileNotFoundError`` to handle both."""


# -- pixels ---------------------------------------------------------------------------
def to_pixels(images: Tensor) -> Tensor:
    """[-1, 1] float images -> [0, 255] float64 pixel values rounded to integers."""
    return ((images.detach().double().clamp(-1, 1) + 1) * 127.5).round()


def to_uint8(images: Tensor) -> Tensor:
    return to_pixels(images).to(torch.uint8)


def psnr_per_image(prediction: Tensor, target: Tensor, data_range: float = 255.0) -> Tensor:
    """PSNR of each image (B,) in dB, inputs on the same [0, data_range] scale.

    The MSE is floored at 1e-10 so identical images give a large finite value instead of
    inf (which would make a mean over the split meaningless)."""
    if prediction.shape != target.shape:
        raise ValueError(f"psnr_per_image: shapes differ, {tuple(prediction.shape)} vs {tuple(target.shape)}")
    mse = (prediction.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def ssim_per_image(prediction: Tensor, target: Tensor, data_range: float = 255.0) -> Tensor:
    """SSIM of each image (B,), Gaussian window 11 / sigma 1.5 (Wang et al. defaults)."""
    return structural_similarity_index_measure(
        prediction.double(), target.double(), data_range=data_range, reduction="none"
    )


# -- split-level accumulators ------------------------------------------------------------
class MeanMeter:
    """Mean of per-image values over the split, reduced across ranks once."""

    def __init__(self):
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, values: Tensor) -> None:
        values = values.detach().double().cpu().reshape(-1)
        self.total += values.sum()
        self.count += values.numel()

    def compute(self, device: torch.device = torch.device("cpu")) -> float:
        dev = reduce_device(device)
        packed = all_reduce_sum(torch.stack([self.total, self.count]).to(dev)).cpu()
        return float(packed[0] / packed[1]) if packed[1] > 0 else float("nan")


def as_index_maps(tokens, num_codebooks: int) -> list[Tensor]:
    """``encode``'s output -> one integer tensor per codebook.

    VQGAN and FlexTok return one tensor ((B, H, W) or (B, R)); FQGAN a list of maps, one
    per branch. A single tensor with a leading codebook axis is not guessed at."""
    maps = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
    if len(maps) != num_codebooks:
        raise ValueError(
            f"encode returned {len(maps)} index map(s) but the tokenizer declares "
            f"{num_codebooks} codebook(s) (codebook_sizes). Fix: return a list with one "
            "index tensor per codebook from encode, or correct codebook_sizes."
        )
    for m in maps:
        if m.is_floating_point():
            raise TypeError("encode of a discrete tokenizer must return integer indices, got floats")
    return maps


class CodeUsage:
    """Code counts per codebook over the whole split (exact, not a recent-index window)."""

    def __init__(self, codebook_sizes: Sequence[int]):
        self.codebook_sizes = tuple(int(k) for k in codebook_sizes)
        self.counts = [torch.zeros(k, dtype=torch.long) for k in self.codebook_sizes]

    def update(self, index_maps: Sequence[Tensor]) -> None:
        for counts, indices, k in zip(self.counts, index_maps, self.codebook_sizes):
            flat = indices.detach().reshape(-1).long()
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= k):
                raise ValueError(f"code index out of range [0, {k}): min {int(flat.min())}, max {int(flat.max())}")
            counts += torch.bincount(flat, minlength=k).cpu()

    def synced_counts(self, device: torch.device = torch.device("cpu")) -> list[Tensor]:
        dev = reduce_device(device)
        return [all_reduce_sum(c.to(dev)).cpu() for c in self.counts]

    @staticmethod
    def usage(counts: Tensor) -> float:
        return float((counts > 0).double().mean())

    @staticmethod
    def perplexity(counts: Tensor) -> float:
        probs = counts.double() / counts.sum().clamp_min(1)
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum()
        return float(entropy.exp())


# -- FID ---------------------------------------------------------------------------------
class RandomFeatures(nn.Module):
    """Small fixed random conv net standing in for Inception in smoke runs only.

    Takes uint8 images like torchmetrics' Inception wrapper and returns 64-d features;
    its FIDs are not comparable with anything and the report says so."""

    num_features = 64

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, self.num_features, 3, padding=1),
        )
        with torch.no_grad():  # seeded so every rank and every run has the same network
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * (1.0 / math.sqrt(max(1, p[0].numel()))))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # never leaves eval mode
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x = images.to(self.net[0].weight.dtype) / 127.5 - 1
        x = nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=False)
        return self.net(x).mean((2, 3))


def inception_search_paths(weights: str | None) -> list[Path]:
    paths = [Path(weights).expanduser()] if weights else []
    paths.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    return paths


def find_inception_weights(weights: str | None) -> Path:
    """Local Inception weights: the configured file, else the torch hub cache."""
    paths = inception_search_paths(weights)
    for path in paths:
        if path.is_file():
            return path
    raise MissingWeightsError(
        "FID Inception weights not found.\n"
        f"Looked in: {', '.join(str(p) for p in paths)} (no downloads on this machine).\n"
        f"Fix: download {INCEPTION_URL}\n"
        f"and put it at {paths[-1]} or set metrics.fid.weights=/path/{INCEPTION_FILE},\n"
        "or run with debug=smoke (random feature network, FIDs not comparable)."
    )


def build_fid(weights: str | None = None, random_features: bool = False, float64_features: bool = True):
    """torchmetrics FID with local Inception weights (or the smoke-test random network).

    ``float64_features`` also runs Inception in float64 (torchmetrics' recommendation for
    exact FIDs; statistics are float64 either way)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if random_features:
        fid = FrechetInceptionDistance(feature=RandomFeatures(), normalize=False)
    else:
        path = find_inception_weights(weights)
        fid = FrechetInceptionDistance(
            feature=2048, normalize=False, antialias=False, feature_extractor_weights_path=str(path)
        )
        if float64_features:
            fid.set_dtype(torch.float64)
    return fid


def fid_description(random_features: bool) -> str:
    if random_features:
        return "SMOKE: random 64-d conv features instead of Inception; FID values are not comparable"
    return f"Inception-v3 pool3 (2048-d, torch-fidelity weights), {FID_RESIZE}, float64 statistics"


def frechet_distance(fid) -> float:
    """``fid.compute()`` (torchmetrics syncs the float64 feature sums across ranks)."""
    return float(fid.compute())


# -- LPIPS --------------------------------------------------------------------------------
def build_lpips(weights: str | None = None, allow_random: bool = False):
    """LPIPS-VGG (v0.1) of ``tokenizers.perceptual`` (local VGG16 weights only).

    Without the weights: stop with a message naming the file (default), or, for
    ``debug=smoke`` (``allow_random``), a random backbone seeded identically on every
    rank; ``.backbone`` says which one ran and goes into the report."""
    from tokenizers.perceptual import LPIPS, VGG16_FILE, default_vgg_path

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random-backbone fallback must be the same network on every rank
        try:
            return LPIPS(weights=weights, on_missing="random" if allow_random else "error")
        except FileNotFoundError as error:  # the same file, told with the evaluator's own keys
            raise MissingWeightsError(
                "LPIPS backbone weights (torchvision VGG16, ImageNet) not found.\n"
                f"Looked in: {weights or default_vgg_path()} (no downloads on this machine).\n"
                f"Fix: download https://download.pytorch.org/models/{VGG16_FILE}\n"
                f"and put it at {default_vgg_path()} or set metrics.lpips.weights=/path/{VGG16_FILE},\n"
                "or run with debug=smoke (random backbone, LPIPS not comparable)."
            ) from error


def lpips_description(lpips) -> str:
    return f"LPIPS v0.1 (VGG16 backbone: {lpips.backbone}), inputs in [-1, 1]"
