"""Generators for generation quality (gFID): each tokenizer gets its paper's generator family.

    python train.py experiment=generator generator.tokenizer_ckpt=<run dir | .ckpt | pretrained:...> [debug=smoke]

(``train.py`` hands configs with ``task: generator`` to ``fit_generator``.) Steps:

1. ``training.generator_cache.TokenCache`` encodes the training split once with the frozen
   tokenizer: token indices for discrete tokenizers, latents (+ per-channel statistics) for
   continuous ones.
2. ``choose_family`` picks the generator from the tokenizer's contract facts
   (``generator.family=auto``; any family name overrides it):

   ===============  =================================================  ===================================
   family           chosen when                                        model
   ===============  =================================================  ===================================
   raster_ar        discrete, one codebook, 2D token map (VQGAN)       LlamaGen c2i GPT, raster order
   factorized_ar    discrete, K > 1 codebooks per position (FQGAN)     FQGAN's FAR: GPT + AR head
   sequence_ar      discrete, 1D ordered tokens (FlexTok)              GPT over the sequence, 1D RoPE
   latent_dit       continuous latents (VAE, VA-VAE)                   LightningDiT-style flow model
   ===============  =================================================  ===================================

   Each family's model, optimizer, EMA and sampling settings live in
   ``generator.families.<family>`` (``conf/generator/default.yaml``).
3. ``TokenARModule`` trains the AR families with cross-entropy (mean over codebooks);
   ``sequence_ar`` draws a prefix length per batch like FlexTok's nested dropout, so one model
   is trained on every length it will be sampled at. ``LatentFlowModule`` trains the
   LightningDiT-style model with the rectified-flow loss of ``diffusion.flow`` (t = 0 data) plus
   LightningDiT's cosine term. Lightning does the loop, logging, checkpoints and resume as for
   tokenizers.
4. ``evaluate.py generators=[<run dir>]`` calls ``module.sample_images`` with the family's
   sampling settings (``evaluation.generation``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from diffusion import flow
from training.ema import EMA
from training.generator_cache import TokenCache, contract_tokens

log = logging.getLogger(__name__)

FAMILIES = ("raster_ar", "factorized_ar", "sequence_ar", "latent_dit")


def sample_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def per_sample_randn(indices: list[int], shape: tuple[int, ...], seed: int) -> Tensor:
    """Noise of each sample index from its own generator (independent of batching and ranks)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                        for i in indices])


def per_sample_rand(indices: list[int], shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.stack([torch.rand(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                        for i in indices])


# -- facts and family ---------------------------------------------------------------------------
def tokenizer_facts(tokenizer, resolution: int) -> dict[str, Any]:
    """What a generator needs to know about its tokenizer, from the contract alone."""
    facts: dict[str, Any] = {"discrete": bool(tokenizer.discrete), "resolution": int(resolution),
                             "token_shape": list(tokenizer.token_shape(resolution))}
    if tokenizer.discrete:
        facts["vocab_sizes"] = [int(v) for v in tokenizer.codebook_sizes]
    else:
        facts["latent_shape"] = list(tokenizer.latent_shape(resolution))
    return facts


def choose_family(facts: dict[str, Any]) -> str:
    """The generator family that fits the tokenizer (the table in the module doc)."""
    if not facts["discrete"]:
        return "latent_dit"
    if len(facts["vocab_sizes"]) > 1:
        return "factorized_ar"
    return "sequence_ar" if len(facts["token_shape"]) == 1 else "raster_ar"


def check_family(family: str, facts: dict[str, Any]) -> None:
    ar = family != "latent_dit"
    if family not in FAMILIES:
        raise ValueError(f"generator.family={family!r} is not known; use auto or one of {FAMILIES}.")
    if ar != facts["discrete"]:
        kind = "discrete tokens" if facts["discrete"] else "continuous latents"
        raise ValueError(f"generator.family={family} does not fit a tokenizer with {kind}. "
                         f"Fix: generator.family=auto (here: {choose_family(facts)}).")
    if family == "latent_dit" and facts["latent_shape"][1] != facts["latent_shape"][2]:
        raise ValueError(f"latent_dit needs square latents, the tokenizer gives {facts['latent_shape']}.")


# -- modules ---------------------------------------------------------------------------------------
class GeneratorModule(pl.LightningModule):
    """What every family shares: the model, its EMA copy (sampled by evaluate.py), AdamW with
    weight decay on matrices only, gradient clipping and the facts saved in checkpoints."""

    def __init__(self, model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer], ema_decay: float = 0.9999,
                 grad_clip: float | None = 1.0, sampling: dict | None = None):
        super().__init__()
        self.model = model
        self.ema = EMA(model, ema_decay)
        self.optimizer_factory = optimizer
        self.grad_clip = grad_clip
        self.sampling: dict[str, Any] = dict(sampling or {})
        self.run_config: dict | None = None
        self.facts: dict[str, Any] = {}

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

    def sample_images(self, tokenizer, indices: list[int], sampling: dict | None = None, seed: int = 0,
                      num_tokens: int | None = None, decode_options: dict | None = None) -> Tensor:
        """Images in [-1, 1] of the EMA model for sample ``indices`` (label i % classes,
        randomness seeded by (seed, i))."""
        raise NotImplementedError

    def sampling_description(self, sampling: dict | None = None) -> str:
        return ", ".join(f"{k} {v}" for k, v in {**self.sampling, **(sampling or {})}.items())


class TokenARModule(GeneratorModule):
    """Cross-entropy training of ``diffusion.ar.ClassConditionalAR`` on cached token indices.

    ``train_lengths``: null trains on whole sequences; ``pow2`` / ``uniform`` / ``pow2_round``
    draw a kept length k per sample (FlexTok's nested-dropout distributions) and count the
    loss on the first k tokens only. For a causal model this reweights the loss towards the
    first tokens, which every shorter sampling length depends on; a prefix's logits never
    see the tokens after it either way."""

    def __init__(self, model: nn.Module, optimizer, ema_decay: float = 0.9999, grad_clip: float | None = 1.0,
                 sampling: dict | None = None, train_lengths: str | None = None):
        super().__init__(model, optimizer, ema_decay, grad_clip, sampling)
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

    @torch.no_grad()
    def sample_tokens(self, indices: list[int], sampling: dict | None = None, seed: int = 0,
                      num_tokens: int | None = None) -> Tensor:
        model = self.ema.module
        options = {**self.sampling, **(sampling or {})}
        n = model.length if num_tokens is None else int(num_tokens)
        device = model.class_embed.weight.device
        y = torch.tensor([i % model.num_classes for i in indices], device=device)
        uniforms = per_sample_rand(indices, (n, model.num_codebooks), seed).to(device)
        return model.generate(y, num_positions=n, uniforms=uniforms,
                              cfg_scale=options.get("cfg_scale", 1.0), temperature=options.get("temperature", 1.0),
                              top_k=options.get("top_k", 0), top_p=options.get("top_p", 1.0))

    @torch.no_grad()
    def sample_images(self, tokenizer, indices, sampling=None, seed=0, num_tokens=None, decode_options=None):
        tokens = self.sample_tokens(indices, sampling, seed, num_tokens)
        shape = self.facts["token_shape"]
        decoded = contract_tokens(tokens, shape)
        options = dict(decode_options or {})
        if len(shape) == 1:  # an ordered 1D sequence decodes from any prefix (FlexTok)
            options["num_tokens"] = tokens.shape[-1]
        return tokenizer.decode(decoded, **options).float()


class LatentFlowModule(GeneratorModule):
    """Rectified-flow training of a ``LatentDiT`` on normalised latents (``diffusion.flow``'s
    convention: t = 0 data, t = 1 noise, velocity ``eps - x0``), logit-normal t, and
    LightningDiT's cosine term ``1 - cos(v_pred, v)`` per position along channels."""

    def __init__(self, model: nn.Module, optimizer, ema_decay: float = 0.9999, grad_clip: float | None = 1.0,
                 sampling: dict | None = None, time_mean: float = 0.0, time_std: float = 1.0,
                 cosine_weight: float = 0.0):
        super().__init__(model, optimizer, ema_decay, grad_clip, sampling)
        self.time_mean, self.time_std, self.cosine_weight = time_mean, time_std, cosine_weight
        self.register_buffer("latent_mean", torch.zeros(model.in_channels))
        self.register_buffer("latent_std", torch.ones(model.in_channels))

    def set_latent_statistics(self, mean: Tensor, std: Tensor) -> None:
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def denormalize(self, latents: Tensor) -> Tensor:
        """Generator space -> the tokenizer's latent space (input of ``decode_latents``)."""
        return latents * self.latent_std.view(1, -1, 1, 1).to(latents) + self.latent_mean.view(1, -1, 1, 1).to(latents)

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

    @torch.no_grad()
    def sample_latents(self, indices: list[int], sampling: dict | None = None, seed: int = 0) -> Tensor:
        model = self.ema.module
        o = {**self.sampling, **(sampling or {})}
        device = self.latent_mean.device
        y = torch.tensor([i % model.num_classes for i in indices], device=device)
        noise = per_sample_randn(indices, (model.in_channels, model.input_size, model.input_size), seed).to(device)
        latents = model.sample(y, steps=int(o.get("steps", 50)), guidance=float(o.get("cfg_scale", 1.0)),
                               guidance_interval=tuple(o.get("guidance_interval", (0.0, 1.0))),
                               shift=float(o.get("shift", 1.0)), guided_channels=o.get("guided_channels"),
                               noise=noise)
        return self.denormalize(latents)

    @torch.no_grad()
    def sample_images(self, tokenizer, indices, sampling=None, seed=0, num_tokens=None, decode_options=None):
        return tokenizer.decode_latents(self.sample_latents(indices, sampling, seed)).float()


# -- building and loading ------------------------------------------------------------------------
def build_generator(gcfg: DictConfig, facts: dict[str, Any]) -> GeneratorModule:
    family = facts["family"]
    fam = gcfg.families[family]
    common = dict(optimizer=instantiate(fam.optimizer), ema_decay=fam.ema_decay, grad_clip=fam.grad_clip,
                  sampling=OmegaConf.to_container(fam.sampling, resolve=True))
    if family == "latent_dit":
        c, h, _ = facts["latent_shape"]
        model = instantiate(fam.model, in_channels=c, input_size=h, num_classes=facts["num_classes"])
        module: GeneratorModule = LatentFlowModule(model, time_mean=fam.time_mean, time_std=fam.time_std,
                                                   cosine_weight=fam.cosine_weight, **common)
    else:
        model = instantiate(fam.model, vocab_sizes=list(facts["vocab_sizes"]),
                            positions=list(facts["token_shape"]), num_classes=facts["num_classes"])
        module = TokenARModule(model, train_lengths=fam.get("train_lengths"), **common)
    module.facts = dict(facts)
    return module


def load_generator(path: str | os.PathLike) -> tuple[GeneratorModule, DictConfig]:
    """(generator module with its EMA, statistics and facts; the run config) from a checkpoint."""
    from common.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path)
    if "generator_facts" not in ckpt or "config" not in ckpt or "family" not in ckpt["generator_facts"]:
        raise KeyError(f"{path} is not a generator checkpoint of this version (no generator_facts.family / config). "
                       "Fix: pass a checkpoint written by `python train.py experiment=generator`.")
    cfg = OmegaConf.create(ckpt["config"])
    module = build_generator(cfg.generator, ckpt["generator_facts"])
    module.load_state_dict(ckpt["state_dict"])
    module.facts["global_step"] = int(ckpt.get("global_step", -1))
    module.eval()
    return module, cfg


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

    from training.run import configure_cpu_threads

    run_dir = Path(cfg.paths.output_dir)
    threads = configure_cpu_threads(cfg)
    if threads:
        log.info("CPU run: %d intra-op thread(s) per process.", threads)
    pl.seed_everything(cfg.seed, workers=True)
    module, cache = prepare_generator(cfg)
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
    trainer.fit(module, datamodule=cache, ckpt_path=ckpt_path)
    final = checkpoint_dir(run_dir) / LAST
    trainer.save_checkpoint(final)
    if trainer.is_global_zero:
        log.info("Generator (%s): %d steps; checkpoint %s. gFID: python evaluate.py generators=[%s]",
                 module.facts["family"], trainer.global_step, final, run_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
