"""Latent generator for generation quality (gFID): one recipe for every frozen tokenizer.

    python train.py experiment=generator generator.tokenizer_ckpt=logs/train/runs/<run> [debug=smoke]

(``train.py`` hands configs with ``task: generator`` to ``fit_generator``.) Steps:

1. ``LatentDataModule.setup`` encodes the training split once with the frozen tokenizer
   (``encode_latents``: the quantized latent for VQ tokenizers), every image exactly once
   across ranks, centre crop, no flip; each rank writes its shard, the per-channel mean /
   std are reduced across ranks; all of it cached under ``generator.cache_dir`` and reused
   by later runs on the same tokenizer checkpoint and data.
2. ``GeneratorModule`` trains ``diffusion.generator.LatentDiT`` on the normalised latents
   with the rectified-flow loss of ``diffusion.flow`` (t = 0 data, t = 1 noise,
   logit-normal t, velocity target ``eps - x0``, optional cosine velocity-direction term,
   label dropout for CFG inside the model), AdamW, EMA; Lightning does the loop, logging
   and checkpointing as for tokenizers.
3. ``evaluate.py generators=[<run dir>]`` samples the EMA model (class-conditional, CFG)
   and reports gFID (``evaluation.generation``).

The latent statistics live in the checkpoint (buffers ``latent_mean`` / ``latent_std``):
sampling divides nothing by hand, ``denormalize`` is the one place that inverts them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from diffusion import flow
from diffusion.generator import LatentDiT
from training.ema import EMA

log = logging.getLogger(__name__)

CACHE_VERSION = 1


# -- latent cache ----------------------------------------------------------------------------
def cache_key(tokenizer_ckpt: str, data_cfg: dict, ema: bool) -> str:
    """Folder name of a latent cache: the tokenizer checkpoint (path, size, mtime), the data
    config and the weights used. A retrained checkpoint at the same path gets a new cache."""
    st = os.stat(tokenizer_ckpt)
    blob = json.dumps({"ckpt": os.path.abspath(tokenizer_ckpt), "size": st.st_size, "mtime": int(st.st_mtime),
                       "data": data_cfg, "ema": ema, "version": CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def encode_split(tokenizer, batches, device: torch.device, dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor]:
    """(latents (N, C, H, W) in ``dtype``, labels (N,)) of this rank's real images."""
    from data.splits import labelled

    latents, labels = [], []
    tokenizer = tokenizer.to(device).eval()
    for images, y in labelled(batches):
        latents.append(tokenizer.encode_latents(images.to(device).float()).float().cpu().to(dtype))
        labels.append(y.cpu())
    if not latents:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(latents), torch.cat(labels)


def channel_statistics(latents: Tensor, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and std over all ranks' latents (float64 sums, one all-reduce)."""
    from common.distributed import all_reduce_sum, reduce_device

    x = latents.double()
    if x.ndim != 4:  # a rank without images still joins the reduction
        raise ValueError(f"latents must be (N, C, H, W), got {tuple(x.shape)}")
    positions = float(x.shape[0] * x.shape[2] * x.shape[3])
    sums = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), torch.tensor([positions], dtype=torch.float64)])
    sums = all_reduce_sum(sums.to(reduce_device(device))).cpu()
    c = x.shape[1]
    n = sums[-1]
    mean = sums[:c] / n
    var = (sums[c:2 * c] / n - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().clamp_min(1e-6).float(), int(n)


class LatentDataModule(pl.LightningDataModule):
    """Cached, normalised latents of the training split of ``image_data`` (see module doc)."""

    def __init__(self, image_data: pl.LightningDataModule, tokenizer_ckpt: str, cache_dir: str, batch_size: int,
                 num_workers: int = 0, ema: bool = True, cache_dtype: str = "float16",
                 limit_batches: int | None = None, data_key: dict | None = None, seed: int = 0):
        super().__init__()
        self.image_data = image_data
        self.tokenizer_ckpt = tokenizer_ckpt
        self.cache_root = Path(os.path.expanduser(cache_dir))
        self.batch_size, self.num_workers, self.ema, self.seed = int(batch_size), int(num_workers), ema, seed
        self.cache_dtype = getattr(torch, cache_dtype)
        self.limit_batches = limit_batches
        self.data_key = data_key or {}
        self.latents: Tensor | None = None
        self.labels: Tensor | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    @property
    def cache_dir(self) -> Path:
        key = cache_key(self.tokenizer_ckpt, {**self.data_key, "limit_batches": self.limit_batches}, self.ema)
        return self.cache_root / key

    def _device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def setup(self, stage: str | None = None) -> None:
        if self.latents is not None:
            return
        from data.splits import training_split_once
        from common.distributed import barrier, rank, world_size

        folder = self.cache_dir
        done = folder / "stats.pt"
        if not done.is_file():
            from tokenizers.loading import load_tokenizer

            tokenizer, _ = load_tokenizer(self.tokenizer_ckpt, ema=self.ema)
            device = self._device()
            latents, labels = encode_split(tokenizer, training_split_once(self.image_data, self.limit_batches),
                                           device, self.cache_dtype)
            del tokenizer
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"latents": latents, "labels": labels}, folder / f"rank{rank()}-of-{world_size()}.pt")
            mean, std, n = channel_statistics(latents, device)
            barrier()
            if rank() == 0:
                torch.save({"mean": mean, "std": std, "count": n, "world_size": world_size(),
                            "tokenizer_ckpt": str(self.tokenizer_ckpt)}, done)
                log.info("Encoded the training split into %s (%d latent positions per channel).", folder, n)
            barrier()
        stats = torch.load(done, map_location="cpu", weights_only=True)
        shards = sorted(folder.glob(f"rank*-of-{stats['world_size']}.pt"))
        parts = [torch.load(p, map_location="cpu", weights_only=True) for p in shards]
        latents = torch.cat([p["latents"] for p in parts if p["latents"].numel()])
        self.labels = torch.cat([p["labels"] for p in parts if p["labels"].numel()])
        self.mean, self.std = stats["mean"], stats["std"]
        self.latents = latents

    def train_dataloader(self) -> DataLoader:
        from common.distributed import rank, world_size

        dataset = NormalisedLatents(self.latents, self.labels, self.mean, self.std)
        if len(dataset) < self.batch_size * world_size():
            raise ValueError(f"{len(dataset)} cached latents cannot fill one batch of {self.batch_size} per rank. "
                             "Fix: lower generator.batch_size.")
        sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True,
                                     seed=self.seed, drop_last=True)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class NormalisedLatents(Dataset):
    def __init__(self, latents: Tensor, labels: Tensor, mean: Tensor, std: Tensor):
        self.latents, self.labels = latents, labels
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return (self.latents[i].float() - self.mean) / self.std, self.labels[i]


# -- the module -------------------------------------------------------------------------------
class GeneratorModule(pl.LightningModule):
    """Rectified-flow training of a ``LatentDiT`` on normalised latents, EMA copy for sampling."""

    def __init__(self, model: LatentDiT,
                 optimizer: Callable[..., torch.optim.Optimizer] = partial(torch.optim.AdamW, lr=2e-4, betas=(0.9, 0.95),
                                                                        weight_decay=0.0),
                 ema_decay: float = 0.9999, time_mean: float = 0.0, time_std: float = 1.0,
                 cosine_weight: float = 0.0, grad_clip: float | None = 1.0):
        super().__init__()
        self.model = model
        self.ema = EMA(model, ema_decay)
        self.optimizer_factory = optimizer
        self.time_mean, self.time_std = time_mean, time_std
        self.cosine_weight, self.grad_clip = cosine_weight, grad_clip
        self.register_buffer("latent_mean", torch.zeros(model.in_channels))
        self.register_buffer("latent_std", torch.ones(model.in_channels))
        self.run_config: dict | None = None
        self.facts: dict[str, Any] = {}

    def set_latent_statistics(self, mean: Tensor, std: Tensor) -> None:
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def denormalize(self, latents: Tensor) -> Tensor:
        """Generator space -> the tokenizer's latent space (input of ``decode_latents``)."""
        return latents * self.latent_std.view(1, -1, 1, 1).to(latents) + self.latent_mean.view(1, -1, 1, 1).to(latents)

    def loss(self, x0: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        t = flow.sample_time(x0.shape[0], x0.device, self.time_mean, self.time_std)
        eps = torch.randn_like(x0)
        target = flow.velocity_target(x0, eps)
        velocity = self.model(flow.interpolate(x0, eps, t), t, y)
        mse = flow.flow_loss(velocity, target)
        logs = {"mse": mse.detach()}
        total = mse
        if self.cosine_weight > 0:  # velocity-direction term (LightningDiT's optional cosine loss)
            cos = 1 - F.cosine_similarity(velocity.float().flatten(1), target.float().flatten(1), dim=1).mean()
            total = total + self.cosine_weight * cos
            logs["cosine"] = cos.detach()
        return total, logs

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0, y = batch
        total, logs = self.loss(x0, y)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"generator loss is {float(total)} at step {self.global_step}. Fix: enable qk_norm "
                "(generator.model.qk_norm=true), lower the learning rate, or check the latent statistics.")
        self.log("train/loss", total, prog_bar=True)
        for k, v in logs.items():
            self.log(f"train/{k}", v)
        return total

    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.log("train/grad_norm", norm)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update(self.model)

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if isinstance(dm, LatentDataModule) and dm.mean is not None:
            self.set_latent_statistics(dm.mean.to(self.device), dm.std.to(self.device))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["config"] = self.run_config
        checkpoint["generator_facts"] = self.facts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.facts = checkpoint.get("generator_facts", {})


def build_generator(gcfg: DictConfig, facts: dict[str, Any]) -> GeneratorModule:
    model = instantiate(gcfg.model, in_channels=facts["latent_channels"], input_size=facts["latent_size"],
                        num_classes=facts["num_classes"])
    module = GeneratorModule(model, optimizer=instantiate(gcfg.optimizer), ema_decay=gcfg.ema_decay,
                             time_mean=gcfg.time_mean, time_std=gcfg.time_std, cosine_weight=gcfg.cosine_weight,
                             grad_clip=gcfg.grad_clip)
    module.facts = dict(facts)
    return module


def load_generator(path: str | os.PathLike) -> tuple[GeneratorModule, DictConfig]:
    """(GeneratorModule with its EMA, latent statistics and facts; the run config) from a checkpoint."""
    from training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path)
    if "generator_facts" not in ckpt or "config" not in ckpt:
        raise KeyError(f"{path} is not a latent generator checkpoint (no generator_facts / config). "
                       "Fix: pass a checkpoint written by `python train.py experiment=generator`.")
    cfg = OmegaConf.create(ckpt["config"])
    module = build_generator(cfg.generator, ckpt["generator_facts"])
    module.load_state_dict(ckpt["state_dict"])
    module.facts["global_step"] = int(ckpt.get("global_step", -1))
    module.eval()
    return module, cfg


# -- the run --------------------------------------------------------------------------------
def _instantiate_targets(node) -> list:
    """Objects of every child with a ``_target_`` (children set to null or left without a
    target, like a tokenizer-only callback switched off for this task, are skipped)."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def num_classes_of(image_data, gcfg: DictConfig) -> int:
    if gcfg.get("num_classes"):
        return int(gcfg.num_classes)
    image_data.prepare_data()  # shard indexes (classes) may only exist after it (demo data)
    n = getattr(image_data, "num_classes", None)
    if not n:
        raise ValueError("The data module does not say how many classes it has. Fix: set generator.num_classes.")
    return int(n)


def fit_generator(cfg: DictConfig) -> dict[str, float]:
    """Encode (once), train, save ``<run dir>/checkpoints/last.ckpt``; returns final metrics."""
    from training.checkpoints import LAST, AtomicCheckpointIO, checkpoint_dir, load_checkpoint, resolve_resume

    gcfg = cfg.generator
    if not gcfg.get("tokenizer_ckpt"):
        raise ValueError("generator.tokenizer_ckpt is not set. Fix: python train.py experiment=generator "
                         "generator.tokenizer_ckpt=logs/train/runs/<run> (a run directory or a .ckpt).")
    tokenizer_ckpt = str(Path(resolve_resume(str(gcfg.tokenizer_ckpt), ".", "never")).resolve())
    run_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["val_remainder"] = "pad"  # every training image encoded exactly once across ranks
    image_data = instantiate(data_cfg)
    # the latent grid comes from the tokenizer's facts, no encoding needed to build the model
    saved = OmegaConf.create(load_checkpoint(tokenizer_ckpt)["config"])
    tokenizer = instantiate(saved.tokenizer)
    c, h, w = tokenizer.latent_shape(int(cfg.data.resolution))
    del tokenizer
    if h != w:
        raise ValueError(f"LatentDiT needs square latents, the tokenizer gives {h}x{w}.")
    facts = {"latent_channels": c, "latent_size": h, "num_classes": num_classes_of(image_data, gcfg),
             "tokenizer_ckpt": tokenizer_ckpt, "resolution": int(cfg.data.resolution)}
    module = build_generator(gcfg, facts)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    module.run_config["generator"]["tokenizer_ckpt"] = tokenizer_ckpt

    latents = LatentDataModule(image_data, tokenizer_ckpt, gcfg.cache_dir, gcfg.batch_size,
                               num_workers=gcfg.get("num_workers", 0), ema=gcfg.get("tokenizer_ema", True),
                               cache_dtype=gcfg.get("cache_dtype", "float16"),
                               limit_batches=gcfg.get("encode_limit_batches"), data_key=data_cfg, seed=cfg.seed)
    callbacks = _instantiate_targets(cfg.get("callbacks"))
    loggers = _instantiate_targets(cfg.get("logger"))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in ("val_check_interval", "limit_val_batches", "check_val_every_n_epoch"):
        trainer_cfg.pop(key, None)  # no validation loop: gFID is measured by evaluate.py
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                          plugins=[AtomicCheckpointIO()], limit_val_batches=0)
    for logger in loggers:
        if hasattr(logger, "log_hyperparams"):
            logger.log_hyperparams(module.run_config)
    ckpt_path = resolve_resume(cfg.get("ckpt_path"), run_dir, cfg.get("resume", "auto"))
    trainer.fit(module, datamodule=latents, ckpt_path=ckpt_path)
    final = checkpoint_dir(run_dir) / LAST
    trainer.save_checkpoint(final)
    if trainer.is_global_zero:
        log.info("Generator: %d steps; checkpoint %s. gFID: python evaluate.py generators=[%s]",
                 trainer.global_step, final, run_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
