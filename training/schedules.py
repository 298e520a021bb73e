"""Learning-rate schedules, as a factor of the configured learning rate at a given step.

A schedule here holds no state: the module sets ``lr = configured lr * schedule(step,
max_steps)`` before every optimizer step, so a resumed run (or one resumed with another
``lr`` in its config, training/resume.py) lands on the same curve without a scheduler
state in the checkpoint. The papers' tokenizers train at a constant rate (LlamaGen, FQGAN,
VA-VAE); a short linear decay at the end is what makes the few-minute demo converge.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupStableDecay:
    """Linear warm-up from 0 over ``warmup_steps``, constant, then a linear decay to
    ``final_ratio`` over the last ``decay_steps`` (or ``decay_fraction`` of the run) before
    ``max_steps``. With both at 0 it is the constant rate."""

    warmup_steps: int = 0
    decay_steps: int = 0
    decay_fraction: float = 0.0
    final_ratio: float = 0.0

    def __post_init__(self):
        if self.warmup_steps < 0 or self.decay_steps < 0 or not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"{self}: warmup_steps and decay_steps must be >= 0 and decay_fraction in [0, 1]")
        if self.decay_steps and self.decay_fraction:
            raise ValueError(f"{self}: give decay_steps or decay_fraction, not both. Fix: set the other to 0, "
                             "e.g. module.lr_schedule.decay_fraction=0")
        if not 0.0 <= self.final_ratio <= 1.0:
            raise ValueError(f"{self}: final_ratio must be in [0, 1]")

    def __call__(self, step: int, max_steps: int | None) -> float:
        factor = 1.0
        if self.warmup_steps and step < self.warmup_steps:
            factor = (step + 1) / self.warmup_steps
        decay = self.decay_steps or (round(self.decay_fraction * max_steps) if max_steps and max_steps > 0 else 0)
        if decay and max_steps and max_steps > 0:
            start = max_steps - decay
            if step >= start:
                done = min(1.0, (step - start) / decay)
                factor = min(factor, 1.0 - (1.0 - self.final_ratio) * done)
        return factor
