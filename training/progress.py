"""What a run tells the person watching it: one progress bar over the run's total steps,
a first block saying what is trained and how long it should take, and validation results
as they are computed.

Epochs are an implementation detail of resampled shards (``with_epoch`` cuts an endless
stream), so the bar counts ``trainer.global_step`` against ``trainer.max_steps`` and its
ETA follows the recent step rate (the discriminator makes steps slower once it starts).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


class RunProgressBar(TQDMProgressBar):
    """Lightning's bar, with the training bar spanning the whole run (``max_steps``) and
    never reset at epoch boundaries. ``smoothing``: weight of the latest rate in tqdm's ETA
    (0 = the average since the start, which misses the slower GAN phase)."""

    def __init__(self, refresh_rate: int = 10, smoothing: float = 0.05, process_position: int = 0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)
        self.smoothing = smoothing

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return Tqdm(desc="Training steps", total=total, initial=trainer.global_step,  # resumed: where it stopped
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=self.smoothing, bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or not self.is_enabled:
            return
        every = min(self.refresh_rate, max(1, (bar.total or 0) // 50))  # short runs: every step
        if step % every == 0 or step == bar.total:
            bar.update(step - bar.n)  # update() (not n=) feeds tqdm's smoothed rate
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.train_progress_bar is not None and not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version says nothing to a reader
        return metrics


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e8 else f"{n / 1e9:.2f}B"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunSummary(pl.Callback):
    """Logs (rank 0) what is trained before the first step, an estimated duration measured
    over steps ``skip + 1 .. skip + measure_steps`` (the first steps pay one-off costs),
    a second estimate once the discriminator has trained ``measure_steps`` steps, and the
    validation metrics each time they are computed.

    ``seconds_per_step`` and ``estimated_seconds`` keep the last measurement."""

    SHOWN = ("val/psnr", "val/loss/pixel", "val/loss/perceptual", "val/perplexity", "val/loss/flow", "val/loss")

    def __init__(self, measure_steps: int = 10, skip: int = 2):
        self.measure_steps, self.skip = measure_steps, skip
        self.seconds_per_step: float | None = None
        self.estimated_seconds: float | None = None
        self.validations: list[dict[str, float]] = []
        self._marks: dict[str, float] = {}
        self._disc_start: int | None = None
        self._validation_seconds = 0.0
        self._validation_began: float | None = None

    # -- what is trained -----------------------------------------------------------------
    def describe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        config = getattr(pl_module, "run_config", None) or {}
        model = getattr(pl_module, "tokenizer", None) or getattr(pl_module, "model", None) or pl_module
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        extras = []
        gan = getattr(pl_module, "gan", None)
        if gan is not None and hasattr(gan, "discriminator"):
            disc = sum(p.numel() for p in gan.discriminator.parameters())
            start = getattr(gan, "disc_start", 0)
            extras.append(f"discriminator {_millions(disc)} from step {start}")
        perceptual = getattr(getattr(pl_module, "loss", None), "perceptual", None)
        if perceptual is not None:
            extras.append("LPIPS " + ("on" if getattr(perceptual, "enabled", True) else "OFF")
                          + f" ({getattr(perceptual, 'backbone', 'vgg16')})")
        lines = [f"Training {type(model).__name__} (tokenizer={config.get('run_name', '?')}, "
                 f"scale={config.get('scale_name', '?')}): {_millions(trainable)} trainable parameters"
                 + (f"; {', '.join(extras)}" if extras else "")]
        lines.append("Data: " + self._describe_data(trainer, config))
        threads = torch.get_num_threads()
        device = trainer.strategy.root_device
        interval, limit = trainer.val_check_interval, trainer.limit_val_batches
        every = (f", validation every {interval} steps" if isinstance(interval, int) and limit
                 else f", validation every {interval:g} of an epoch" if limit else ", no validation")
        lines.append(f"Steps: {trainer.max_steps}{every}; device: {trainer.world_size} x {device.type}"
                     + (f" ({threads} intra-op thread(s) per process)" if device.type == "cpu" else ""))
        lines.append(f"Run directory: {trainer.default_root_dir}")
        return lines

    @staticmethod
    def _describe_data(trainer: pl.Trainer, config: dict) -> str:
        data = config.get("data", {}) if isinstance(config, dict) else {}
        dm = trainer.datamodule
        name = str(data.get("_target_", type(dm).__name__)).rsplit(".", 1)[-1]
        parts = [name]
        root = getattr(dm, "root", None)
        if root is not None:
            try:
                from data.shards import read_index

                splits = read_index(root).get("splits", {})
            except Exception:  # facts only; never stop a run for them
                splits = {}
            counts = [f"{splits[s]['samples']} {s}" for s in ("train", "val") if s in splits]
            if counts:
                parts.append(" / ".join(counts) + " images")
            parts.append(f"in {root}")
        resolution, batch = getattr(dm, "resolution", data.get("resolution")), getattr(dm, "batch_size", None)
        if resolution:
            parts.append(f"at {resolution} px")
        if batch:
            parts.append(f"batch {batch} per rank x {trainer.world_size}")
        return ", ".join(parts)

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for line in self.describe(trainer, pl_module):  # before Lightning's model summary
            log.info(line)

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gan = getattr(pl_module, "gan", None)
        self._disc_start = getattr(gan, "disc_start", None) if gan is not None else None
        self._start_step = trainer.global_step
        log.info("Estimating the duration from steps %d-%d ...", trainer.global_step + self.skip + 1,
                 trainer.global_step + self.skip + self.measure_steps)

    # -- how long ------------------------------------------------------------------------
    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        now = time.perf_counter() - self._validation_seconds  # training time only
        first = self._start_step + self.skip
        if step == first:
            self._marks["first"] = now
        elif step == first + self.measure_steps and "first" in self._marks:
            self._estimate(trainer, now - self._marks["first"], step, "first steps")
        if self._disc_start is not None and self._disc_start > first:
            if step == self._disc_start + self.skip:
                self._marks["gan"] = now
            elif step == self._disc_start + self.skip + self.measure_steps and "gan" in self._marks:
                self._estimate(trainer, now - self._marks["gan"], step, "steps with the discriminator")

    def _estimate(self, trainer: pl.Trainer, elapsed: float, step: int, what: str) -> None:
        self.seconds_per_step = elapsed / self.measure_steps
        remaining = max(0, trainer.max_steps - step)
        self.estimated_seconds = self.seconds_per_step * remaining
        note = ""
        if self._disc_start is not None and step < self._disc_start:
            note = (f" The discriminator starts at step {self._disc_start}: later steps are slower and the "
                    "estimate is revised then.")
        log.info("Measured %.3f s/step over %d %s: about %s for the remaining %d steps (plus validation).%s",
                 self.seconds_per_step, self.measure_steps, what, _duration(self.estimated_seconds), remaining, note)

    # -- validation results ----------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_began = time.perf_counter()

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_began is not None:
            self._validation_seconds += time.perf_counter() - self._validation_began
            self._validation_began = None
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
        if not values:
            return
        self.validations.append({"step": trainer.global_step, **values})
        shown = [k for k in self.SHOWN if k in values] or sorted(values)[:6]
        log.info("Validation at step %d: %s (all val/ metrics go to the logger)", trainer.global_step,
                 ", ".join(f"{k[4:]} {values[k]:.4g}" + (" dB" if k == "val/psnr" else "") for k in shown))
