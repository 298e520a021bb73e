"""Builds data, tokenizer, losses, module, callbacks, loggers and trainer from a Hydra
config and fits. ``train.py`` is a thin entry point around ``train``."""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from common.loggers import finish_loggers
from training.acceleration import warn_if_bf16_is_emulated
from training.checkpoints import (
    LAST,
    AtomicCheckpointIO,
    checkpoint_dir,
    load_weights_into,
    resolve_init_from,
    resolve_resume,
)
from training.final_validation import ValidatedStep, validate_final_weights
from training.preflight import ConfigError, user_error
from training.resume import LoggedStepAfterResume
from training.run_lock import run_directory_lock

log = logging.getLogger(__name__)

# Lightning notices that do not apply to this loop (manual optimization is deliberate,
# the EMA copy and frozen teachers/LPIPS are in eval mode on purpose).
for _message in (
    r".*Using ModelCheckpoint with manual optimization.*",
    r".*module\(s\) in eval mode.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*does not have many workers.*",
):
    warnings.filterwarnings("ignore", message=_message)


def _optional_node(cfg: DictConfig, key: str) -> DictConfig | None:
    node = cfg.get(key)
    if node is None or not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    return node


def _optional(cfg: DictConfig, key: str):
    node = _optional_node(cfg, key)
    return None if node is None else instantiate(node)


def _instantiate_all(node: DictConfig | None) -> list:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def build_module(cfg: DictConfig):
    tokenizer = instantiate(cfg.tokenizer)
    pixel_losses = getattr(tokenizer, "reconstructs_in_training", True)
    if not pixel_losses and (_optional_node(cfg, "loss") or _optional_node(cfg, "gan")):
        log.info("%s trains without a pixel reconstruction: the loss and gan groups are not built.",
                 type(tokenizer).__name__)
    module = instantiate(
        cfg.module,
        tokenizer=tokenizer,
        loss=_optional(cfg, "loss") if pixel_losses else None,
        gan=_optional(cfg, "gan") if pixel_losses else None,
        regularizer=_optional(cfg, "regularizer"),
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return module


def configure_cpu_threads(cfg: DictConfig) -> int | None:
    """Intra-op threads per process for CPU runs: ``cpu_threads``, or with ``auto`` the cores
    left after the data workers, shared by the ranks of this machine. Oversubscribed
    OpenMP threads (2 threads + 2 workers on 2 cores) made steps up to 20x slower here."""
    import torch

    setting = cfg.get("cpu_threads", "auto")
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()):
        return None
    if setting in (None, "auto"):
        devices = cfg.trainer.get("devices", 1)
        procs = devices if isinstance(devices, int) and devices > 0 else 1
        workers = int(cfg.data.get("num_workers", 0) or 0)
        n = max(1, ((os.cpu_count() or 1) - workers * procs) // procs)
    else:
        n = int(setting)
    torch.set_num_threads(n)
    return n


def train(cfg: DictConfig) -> dict:
    # before anything reads or writes the run directory: a second run on it refuses here
    with run_directory_lock(cfg.paths.output_dir):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict:
    if cfg.get("task") == "generator":  # the latent generator for gFID (experiment=generator)
        from training.generator_module import fit_generator

        return fit_generator(cfg)
    run_dir = Path(cfg.paths.output_dir)
    threads = configure_cpu_threads(cfg)
    warn_if_bf16_is_emulated(cfg.trainer.get("precision", "32-true"), str(cfg.trainer.get("accelerator", "auto")))
    if threads:
        log.info("CPU run: %d intra-op thread(s) per process (cpu_threads=%s).", threads, cfg.get("cpu_threads", "auto"))
    pl.seed_everything(cfg.seed, workers=True)
    try:  # a missing file found while building stops the run as one message (train.py)
        ckpt_path = resolve_resume(cfg.get("ckpt_path"), run_dir, cfg.get("resume", "auto"))
        # Build the model first: a missing teacher / VAE checkpoint must stop the run before
        # any data is written or read.
        module = build_module(cfg)
        datamodule = instantiate(cfg.data)
        validated = ValidatedStep()
        callbacks = [*_instantiate_all(cfg.get("callbacks")), LoggedStepAfterResume(), validated]
        loggers = _instantiate_all(cfg.get("logger"))
        plugins = list(_instantiate_all(cfg.get("plugins"))) + [AtomicCheckpointIO()]
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)
        if ckpt_path is None and cfg.get("init_from"):
            load_weights_into(module, resolve_init_from(cfg.init_from))
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        raise ConfigError(str(error)) from exc
    for logger in loggers:
        if hasattr(logger, "log_hyperparams"):
            logger.log_hyperparams(module.run_config)

    start = time.time()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        final = checkpoint_dir(run_dir) / LAST
        trainer.save_checkpoint(final)  # always leave the end state, whatever the interval
        validate_final_weights(trainer, module, datamodule, validated)
    except BaseException:
        finish_loggers(loggers, failed=True)
        raise
    finish_loggers(loggers)
    elapsed = time.time() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    if trainer.is_global_zero:
        log.info("Finished %d steps in %.1f s. Checkpoint: %s", trainer.global_step, elapsed, final)
        for k in ("val/loss/pixel", "val/mse", "val/psnr"):
            if k in metrics:
                log.info("%s = %.4f", k, metrics[k])
    return metrics
