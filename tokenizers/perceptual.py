"""LPIPS perceptual distance with a VGG16 backbone, loaded from local files only.

The backbone comes from torchvision's ImageNet VGG16 checkpoint (``vgg16-397923af.pth``)
in the torch hub cache or a given path; the LPIPS linear heads (v0.1) ship inside
torchmetrics, so nothing is downloaded. Inputs are in [-1, 1] (LPIPS' own convention).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import vgg16

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"
# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of torchvision's vgg16.features
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_CHANNELS = (64, 128, 256, 512, 512)


def default_vgg_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_linear_heads_path() -> Path:
    import torchmetrics

    return Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"


class MissingWeightsError(FileNotFoundError):
    """Raised when pretrained weights the run needs are not on disk."""


class LPIPS(nn.Module):
    """LPIPS-VGG (v0.1): unit-normalised VGG features, squared differences, learned 1x1
    channel weights, spatial mean, summed over five layers. Frozen.

    ``weights``: path to the torchvision VGG16 state dict (default: the torch hub cache).
    ``on_missing``: what to do without that file: ``error`` (stop with a message naming
    the fix), ``random`` (random backbone, logged loudly; for ``debug=smoke`` only) or
    ``disable`` (no perceptual term, logged loudly; the CPU demo default).
    """

    rebuilt_from_weight_file = True  # frozen and loaded from its own file: checkpoints leave it out

    def __init__(self, weights: str | None = None, on_missing: str = "error"):
        super().__init__()
        if on_missing not in ("error", "random", "disable"):
            raise ValueError(f"loss.perceptual.on_missing must be error|random|disable, got {on_missing!r}")
        path = Path(os.path.expanduser(weights)) if weights else default_vgg_path()
        features = vgg16(weights=None).features
        self.backbone = "vgg16 (ImageNet)"
        self.enabled = True
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
        elif on_missing == "error":
            raise MissingWeightsError(
                f"LPIPS backbone weights not found.\nLooked in: {path}\n"
                f"Fix: copy torchvision's {VGG16_FILE} to {default_vgg_path()} (or set loss.perceptual.weights=/path/{VGG16_FILE}),\n"
                "or run with debug=smoke (random backbone) or loss.perceptual.on_missing=disable."
            )
        elif on_missing == "random":
            self.backbone = "vgg16 (RANDOM weights: smoke test only, perceptual values are meaningless)"
            log.warning("LPIPS: %s not found; using a RANDOM VGG16 backbone (debug=smoke only).", path)
        else:
            self.enabled = False
            self.backbone = "disabled (weights missing)"
            log.warning(
                "LPIPS: %s not found; training WITHOUT the perceptual loss. Put %s there to enable it.", path, VGG16_FILE
            )
        self.slices = nn.ModuleList(nn.Sequential(*[features[i] for i in range(a, b)]) for a, b in _SLICES)
        heads = torch.load(lpips_linear_heads_path(), map_location="cpu", weights_only=True)
        self.register_buffer("lin", torch.cat([heads[f"lin{i}.model.1.weight"].flatten() for i in range(5)]), persistent=False)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always frozen

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image LPIPS distance, shape (B,)."""
        if not self.enabled:
            return x.new_zeros(x.shape[0])
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = 0.0
        offset = 0
        for block, c in zip(self.slices, _CHANNELS):
            h = block(h)
            fx, fy = h.chunk(2)
            fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            w = self.lin[offset : offset + c].view(1, c, 1, 1)
            total = total + ((fx - fy) ** 2 * w).sum(1).mean((1, 2))
            offset += c
        return total
