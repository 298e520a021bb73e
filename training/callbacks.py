"""Callbacks: reconstruction image grids (PNG + logger) and the final checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from PIL import Image
from torchvision.utils import make_grid

log = logging.getLogger(__name__)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def grid_to_pil(grid: torch.Tensor) -> Image.Image:
    """A (3, H, W) grid in [0, 1] -> 8-bit RGB, rounded as torchvision's ``save_image``.

    The same image object is written to disk and handed to the loggers: wandb 0.31 casts
    float tensors straight to uint8 (no scaling), which turned every [0, 1] grid black."""
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    return Image.fromarray(pixels)


class ReconstructionGrid(pl.Callback):
    """Every ``every_n_steps`` training steps and after each validation, saves a grid
    with inputs on the first row and EMA reconstructions below (one row per token count
    for tokenizers with ``reconstruct_at``, e.g. FlexTok) to ``<run dir>/images`` and
    sends it to the logger when it takes images (W&B)."""

    def __init__(self, dirpath: str, every_n_steps: int = 200, num_images: int = 8,
                 token_counts: tuple[int, ...] = (1, 4, 16, 64, 256), decode_steps: int = 10):
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.token_counts = tuple(token_counts)
        self.decode_steps = decode_steps
        self._val_images: torch.Tensor | None = None

    @torch.no_grad()
    def _grid(self, pl_module, images: torch.Tensor) -> torch.Tensor:
        model = pl_module.eval_tokenizer
        images = images[: self.num_images]
        rows, labels = [images], ["input"]
        if hasattr(model, "reconstruct_at"):
            recs = model.reconstruct_at(images, token_counts=self.token_counts, steps=self.decode_steps)
            rows += [recs[k] for k in sorted(recs)]
            labels += [f"{k} tokens" for k in sorted(recs)]
        else:
            out = model(images)
            if out.reconstruction is not None:
                rows.append(out.reconstruction)
                labels.append("reconstruction")
        self._row_labels = labels
        return make_grid(to_unit(torch.cat(rows)), nrow=images.shape[0], padding=2)

    @rank_zero_only
    def _save(self, trainer, pl_module, images: torch.Tensor, tag: str) -> None:
        was_training = pl_module.training
        grid = self._grid(pl_module, images)
        pl_module.train(was_training)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"{tag}_step{trainer.global_step:07d}.png"
        image = grid_to_pil(grid)
        image.save(path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"images/{tag}", images=[image], step=trainer.global_step,
                                 caption=["rows: " + ", ".join(self._row_labels) + " (EMA weights)"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            self._save(trainer, pl_module, batch[0], "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._val_images = batch[0][: self.num_images].detach()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._val_images is not None and not trainer.sanity_checking:
            self._save(trainer, pl_module, self._val_images, "val")
