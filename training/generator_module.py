"""Generators for generation quality (gFID): each tokenizer gets its paper's generator family.

    python train.py experiment=generator generator.tokenizer_ckpt=<run dir | .ckpt | pretrained:...> [debug=smoke]

(``train.py`` hands configs with ``task: generator`` to ``fit_generator``.) Steps:

1. ``training.generator_cache.TokenCache`` encodes the training split once with the frozen
   tokenizer: token indices for discrete tokenizers, latents (+ per-channel statistics) for
   continuous ones.
2. ``diffusion.samplers.choose_family`` picks the generator from the tokenizer's contract facts
   (``generator.family=auto``; any family name overrides it; the table of families is in
   ``diffusion.samplers``).
   Each family's model, optimizer, EMA and sampling settings live in
   ``generator.families.<family>`` (``conf/generator/default.yaml``).
3. ``TokenARModule`` trains the AR families with cross-entropy (mean over codebooks);
   ``sequence_ar`` draws a prefix length per batch like FlexTok's nested dropout, so one model
   is trained on every length it will be sampled at. ``LatentFlowModule`` trains the
   LightningDiT-style model with the rectified-flow loss of ``diffusion.flow`` (t = 0 data) plus
   LightningDiT's cosine term. Lightning does the loop, logging, checkpoints and resume as for
   tokenizers. Both subclass their family's sampler in ``diffusion.samplers`` (model, EMA,
   latent statistics, facts, sampling), which owns the checkpoint's state_dict layout.
4. ``evaluate.py generators=[<run dir>]`` rebuilds the sampler alone
   (``diffusion.samplers.load_generator``) and calls its ``sample_images`` with the family's
   sampling settings (``evaluation.generation``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from diffusion import flow
from diffusion.samplers import (GeneratorSampler, LatentFlowSampler, TokenARSampler, build_model, check_family,
                               choose_family, tokenizer_facts)
from training.generator_cache import TokenCache

log = logging.getLogger(__name__)


# -- modules ---------------------------------------------------------------------------------------
class GeneratorModule(GeneratorSampler, pl.LightningModule):
    """What every family's training shares, on top of its sampler (``diffusion.samplers``:
    model, EMA copy, sampling settings, facts): AdamW with weight decay on matrices only,
    gradient clipping, the EMA update and the facts and run config saved in checkpoints."""

    def __init__(self, model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], ema_decay: float = 0.9999,
                 grad_clip: float | None = 1.0, sampling: dict | None = None):
        GeneratorSampler.__init__(self, model, ema_decay, sampling)  # its super() is LightningModule
        self.optimizer_factory = optimizer
        self.grad_clip = grad_clip
        self.run_config: dict | None = None

    def loss(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> Tensor:
        total, logs = self.loss(batch)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"generator loss is {float(total)} at step {self.global_step}. Fix: lower the learning rate "
                "(generator.families.<family>.optimizer.lr), or check the cached tokens / latent statistics.")
        self.log("train/loss", total, prog_bar=True)
        for k, v in logs.items():
            self.log(f"train/{k}", v)
        return total

    def configure_optimizers(self):
        # LlamaGen / nanoGPT: weight decay on matrices and embeddings, none on norms and biases
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        plain = [p for p in params if p.ndim < 2]
        groups = [{"params": decay}] + ([{"params": plain, "weight_decay": 0.0}] if plain else [])
        return self.optimizer_factory(groups)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.log("train/grad_norm", norm)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["config"] = self.run_config
        checkpoint["generator_facts"] = self.facts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.facts = checkpoint.get("generator_facts", {})


class TokenARModule(TokenARSampler, GeneratorModule):
    """Cross-entropy training of ``diffusion.ar.ClassConditionalAR`` on cached token indices.

    ``train_lengths``: null trains on whole sequences; ``pow2`` / ``uniform`` / ``pow2_round``
    draw a kept length k per sample (FlexTok's nested-dropout distributions) and count the
    loss on the first k tokens only. For a causal model this reweights the loss towards the
    first tokens, which every shorter sampling length depends on; a prefix's logits never
    see the tokens after it either way."""

    def __init__(self, model: nn.Module, optimizer, ema_decay: float = 0.9999, grad_clip: float | None = 1.0,
                 sampling: dict | None = None, train_lengths: str | None = None):
        GeneratorModule.__init__(self, model, optimizer, ema_decay, grad_clip, sampling)
        self.train_lengths = train_lengths

    def loss(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, y = batch
        logits = self.model(tokens, y)
        b, _, n = tokens.shape
        weight = torch.ones(b, n, device=tokens.device)
        if self.train_lengths:
            from tokenizers.flextok import sample_keep_counts

            keep = sample_keep_counts(b, n, self.train_lengths, device=tokens.device)
            weight = (torch.arange(n, device=tokens.device)[None] < keep[:, None]).float()
        per_codebook = []
        for j, l in enumerate(logits):
            ce = F.cross_entropy(l.reshape(-1, l.shape[-1]), tokens[:, j].reshape(-1), reduction="none")
            per_codebook.append((ce * weight.reshape(-1)).sum() / weight.sum())
        total = torch.stack(per_codebook).mean()
        logs = {f"ce/{j}": v.detach() for j, v in enumerate(per_codebook)} if len(per_codebook) > 1 else {}
        if self.train_lengths:
            logs["kept_tokens"] = weight.sum(1).mean()
        return total, logs


class LatentFlowModule(LatentFlowSampler, GeneratorModule):
    """Rectified-flow training of a ``LatentDiT`` on normalised latents (``diffusion.flow``'s
    convention: t = 0 data, t = 1 noise, velocity ``eps - x0``), logit-normal t, and
    LightningDiT's cosine term ``1 - cos(v_pred, v)`` per position along channels."""

    def __init__(self, model: nn.Module, optimizer, ema_decay: float = 0.9999, grad_clip: float | None = 1.0,
                 sampling: dict | None = None, time_mean: float = 0.0, time_std: float = 1.0,
                 cosine_weight: float = 0.0):
        GeneratorModule.__init__(self, model, optimizer, ema_decay, grad_clip, sampling)
        self.register_latent_statistics()
        self.time_mean, self.time_std, self.cosine_weight = time_mean, time_std, cosine_weight

    def loss(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        x0, y = batch
        t = flow.sample_time(x0.shape[0], x0.device, self.time_mean, self.time_std)
        eps = torch.randn_like(x0)
        target = flow.velocity_target(x0, eps)
        velocity = self.model(flow.interpolate(x0, eps, t), t, y)
        mse = flow.flow_loss(velocity, target)
        logs = {"mse": mse.detach()}
        total = mse
        if self.cosine_weight > 0:
            cos = (1 - F.cosine_similarity(velocity.float(), target.float(), dim=1)).mean()
            total = total + self.cosine_weight * cos
            logs["cosine"] = cos.detach()
        return total, logs

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if isinstance(dm, TokenCache) and dm.mean is not None:
            self.set_latent_statistics(dm.mean.to(self.device), dm.std.to(self.device))


# -- building and loading ------------------------------------------------------------------------
def build_generator(gcfg: DictConfig, facts: dict[str, Any]) -> GeneratorModule:
    """The trainable module; ``diffusion.samplers.load_generator`` rebuilds its sampler
    part from the checkpoint (same state_dict keys)."""
    fam = gcfg.families[facts["family"]]
    model = build_model(fam, facts)
    common = dict(optimizer=instantiate(fam.optimizer), ema_decay=fam.ema_decay, grad_clip=fam.grad_clip,
                  sampling=OmegaConf.to_container(fam.sampling, resolve=True))
    if facts["family"] == "latent_dit":
        module: GeneratorModule = LatentFlowModule(model, time_mean=fam.time_mean, time_std=fam.time_std,
                                                   cosine_weight=fam.cosine_weight, **common)
    else:
        module = TokenARModule(model, train_lengths=fam.get("train_lengths"), **common)
    module.facts = dict(facts)
    return module


# -- the run --------------------------------------------------------------------------------------
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


def prepare_generator(cfg: DictConfig) -> tuple[GeneratorModule, TokenCache]:
    """The generator module (family chosen from the tokenizer) and its token cache."""
    from tokenizers.loading import load_tokenizer, resolve_spec

    gcfg = cfg.generator
    if not gcfg.get("tokenizer_ckpt"):
        raise ValueError("generator.tokenizer_ckpt is not set. Fix: python train.py experiment=generator "
                         "generator.tokenizer_ckpt=logs/train/runs/<run> (a run directory, a .ckpt or pretrained:...).")
    spec = resolve_spec(str(gcfg.tokenizer_ckpt), "generator.tokenizer_ckpt")
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg["val_remainder"] = "pad"  # every training image encoded exactly once across ranks
    image_data = instantiate(data_cfg)
    tokenizer, _ = load_tokenizer(spec, ema=bool(gcfg.get("tokenizer_ema", True)))
    facts = tokenizer_facts(tokenizer, int(cfg.data.resolution))
    del tokenizer
    family = choose_family(facts) if gcfg.family in (None, "auto") else str(gcfg.family)
    check_family(family, facts)
    facts.update(family=family, num_classes=num_classes_of(image_data, gcfg), tokenizer_ckpt=spec)
    module = build_generator(gcfg, facts)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    module.run_config["generator"]["tokenizer_ckpt"] = spec
    module.run_config["generator"]["family"] = family
    log.info("Generator family %s for %s (%s).", family, spec,
             "continuous latents" if not facts["discrete"] else f"codebooks {facts['vocab_sizes']}, tokens {facts['token_shape']}")
    cache = TokenCache(image_data, spec, gcfg.cache_dir, gcfg.batch_size, discrete=facts["discrete"],
                       vocab_sizes=facts.get("vocab_sizes", ()), num_workers=gcfg.get("num_workers", 0),
                       ema=gcfg.get("tokenizer_ema", True), cache_dtype=gcfg.get("cache_dtype", "float16"),
                       limit_batches=gcfg.get("encode_limit_batches"), chunk_batches=gcfg.get("encode_chunk_batches", 100),
                       data_key=data_cfg, seed=cfg.seed)
    return module, cache


def fit_generator(cfg: DictConfig) -> dict[str, float]:
    """Encode (once), train, save ``<run dir>/checkpoints/last.ckpt``; returns final metrics."""
    from training.checkpoints import LAST, AtomicCheckpointIO, checkpoint_dir, resolve_resume
    from training.resume import LoggedStepAfterResume

    from training.run import configure_cpu_threads

    run_dir = Path(cfg.paths.output_dir)
    threads = configure_cpu_threads(cfg)
    if threads:
        log.info("CPU run: %d intra-op thread(s) per process.", threads)
    pl.seed_everything(cfg.seed, workers=True)
    module, cache = prepare_generator(cfg)
    # the final save below is written after the loop, as in training.run
    callbacks = [*_instantiate_targets(cfg.get("callbacks")), LoggedStepAfterResume()]
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
    trainer.fit(module, datamodule=cache, ckpt_path=ckpt_path)
    final = checkpoint_dir(run_dir) / LAST
    trainer.save_checkpoint(final)
    if trainer.is_global_zero:
        log.info("Generator (%s): %d steps; checkpoint %s. gFID: python evaluate.py generators=[%s]",
                 module.facts["family"], trainer.global_step, final, run_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
