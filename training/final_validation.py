"""The run's last figures are the final weights': validate once more after ``fit`` when the
last step fell between two validations (``max_steps`` not a multiple of
``val_check_interval``), instead of reporting the metrics of an older step as the result."""
from __future__ import annotations

import logging

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class ValidatedStep(pl.Callback):
    """Remembers the ``global_step`` of the last validation run by ``fit``."""

    def __init__(self):
        self.step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def validate_final_weights(trainer: pl.Trainer, module: pl.LightningModule, datamodule, seen: ValidatedStep) -> bool:
    """Runs the validation loop on the final weights if ``fit`` completed its steps without
    validating them; returns whether it ran."""
    completed = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    validates = bool(trainer.limit_val_batches) and trainer.val_check_interval is not None
    if not (completed and validates) or seen.step == trainer.global_step:
        return False
    log.info("Validating the final weights (step %d; the last validation was at step %s).", trainer.global_step,
             seen.step if seen.step is not None else "-")
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return True
