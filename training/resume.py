"""Resuming with a config that differs from the checkpoint's: the run's config wins, and
every difference is logged.

Lightning restores an optimizer's ``param_groups`` from the checkpoint, learning rate and
betas included, so a value changed in the config when resuming (``module.optimizer.lr=...``)
would be silently ignored while the new checkpoint's saved config records it. Before the
state is loaded, the saved hyperparameters are replaced by the configured ones (the
moments and step counts stay), and every change is logged.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerStatus

log = logging.getLogger(__name__)


def configured_defaults(factory: Callable[..., torch.optim.Optimizer]) -> dict:
    """The hyperparameters ``factory`` gives an optimizer (built on a throwaway parameter)."""
    return dict(factory([torch.nn.Parameter(torch.zeros(1))]).defaults)


def apply_configured_settings(saved_states: Sequence[dict], factories: Sequence[Callable], names: Sequence[str],
                              scheduled: Sequence[str] = ()) -> list[str]:
    """Overwrites the hyperparameters in ``saved_states`` (``checkpoint["optimizer_states"]``,
    in place) with the configured ones; returns the changes as ``"name key: old -> new"``.
    ``scheduled`` keys (``lr`` under a schedule) are set at every step and left alone here."""
    changes: list[str] = []
    for state, factory, name in zip(saved_states, factories, names):
        configured = {k: v for k, v in configured_defaults(factory).items() if k not in scheduled}
        for group in state.get("param_groups", []):
            for key, value in configured.items():
                if key in group and not _same(group[key], value):
                    change = f"{name} optimizer {key}: {_show(group[key])} -> {_show(value)}"
                    if change not in changes:
                        changes.append(change)
                    group[key] = value
    if changes:
        log.warning("Resuming with optimizer settings that differ from the checkpoint's; the config's values are "
                    "applied (moments and step counts kept): %s", "; ".join(changes))
    return changes


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return a == b


def _show(value) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_show(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_changes(saved: dict, current: dict) -> list[str]:
    """``"key: saved -> current"`` for every leaf that differs between two run configs."""
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    return [f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, missing) != new.get(key, missing)]


def log_config_changes(saved: dict | None, current: dict | None) -> list[str]:
    if not saved or not current:
        return []
    changes = config_changes(saved, current)
    if changes:
        log.warning("Resuming with %d config value(s) changed since the checkpoint was written; the new values "
                    "apply from here on and are saved in the next checkpoints:\n  %s", len(changes),
                    "\n  ".join(changes))
    return changes


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: tree}


class LoggedStepAfterResume(pl.Callback):
    """Keeps the logged step continuous when a run resumes from the checkpoint written after
    ``trainer.fit`` returned (``training.run``'s final ``last.ckpt``).

    Lightning's loop counter for logging (``_batches_that_stepped``) is saved before its
    per-batch increment in the checkpoints Lightning writes inside the loop, and after it in
    a checkpoint written once the loop has finished. On resume, when validation was due at
    the saved batch, Lightning assumes the former: it runs one empty iteration that only adds
    one to the counter, so every later step would be logged one higher (0, 1, 2, 4, 5, ...)
    in the CSV and W&B. The final checkpoint is marked, and at the first trained batch after
    resuming from it the counter is set back to the saved value."""

    KEY = "saved_after_fit"

    def __init__(self) -> None:
        self._saved_count: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = trainer.state.status == TrainerStatus.FINISHED

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved_count = None
        if checkpoint.get(self.KEY):
            loop_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            self._saved_count = loop_state.get("_batches_that_stepped")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._saved_count is not None:
            loop = trainer.fit_loop.epoch_loop
            if loop._batches_that_stepped != self._saved_count:
                log.debug("Logged step %d set back to the saved %d after resume.", loop._batches_that_stepped,
                          self._saved_count)
                loop._batches_that_stepped = self._saved_count
            self._saved_count = None
