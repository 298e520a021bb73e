"""Trained generators as samplers: what ``evaluation`` needs of a generator, below both
``training`` and ``evaluation`` (DESIGN.md "Layers").

A sampler holds a family's model, its EMA copy (the one sampled), the sampling settings, the
tokenizer facts and, for latents, the per-channel statistics. ``training.generator_module``'s
LightningModules subclass these samplers and add the loss and the loop, so a training
checkpoint's ``state_dict`` (``model.*``, ``ema.*``, ``latent_mean``/``latent_std``) loads
here unchanged: ``load_generator`` rebuilds the sampler from the checkpoint alone.

Families (``choose_family``, from the tokenizer's contract facts):

===============  =================================================  ===================================
family           chosen when                                        model
===============  =================================================  ===================================
raster_ar        discrete, one codebook, 2D token map (VQGAN)       LlamaGen c2i GPT, raster order
factorized_ar    discrete, K > 1 codebooks per position (FQGAN)     FQGAN's FAR: GPT + AR head
sequence_ar      discrete, 1D ordered tokens (FlexTok)              GPT over the sequence, 1D RoPE
latent_dit       continuous latents (VAE, VA-VAE)                   LightningDiT-style flow model
===============  =================================================  ===================================

Sample i has label ``i % num_classes`` and its randomness from a generator seeded with
``(seed, i)``, so samples do not depend on batching or rank counts.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from common.ema import EMA

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


def contract_tokens(sequence: Tensor, token_shape: Sequence[int]) -> Any:
    """(B, K, L) -> what the tokenizer's ``decode`` reads: one (B, *token_shape) map for
    K = 1, a tuple of K maps for K > 1; a 1D shape keeps the (possibly shorter) length L."""
    b, k, n = sequence.shape
    shape = (n,) if len(token_shape) == 1 else tuple(token_shape)
    maps = [sequence[:, j].reshape(b, *shape) for j in range(k)]
    return maps[0] if k == 1 else tuple(maps)


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


# -- samplers ------------------------------------------------------------------------------------
class GeneratorSampler(nn.Module):
    """The model, its EMA copy (sampled), the sampling settings and the tokenizer facts."""

    def __init__(self, model: nn.Module, ema_decay: float = 0.9999, sampling: dict | None = None):
        super().__init__()
        self.model = model
        self.ema = EMA(model, ema_decay)
        self.sampling: dict[str, Any] = dict(sampling or {})
        self.facts: dict[str, Any] = {}

    def sample_images(self, tokenizer, indices: list[int], sampling: dict | None = None, seed: int = 0,
                      num_tokens: int | None = None, decode_options: dict | None = None) -> Tensor:
        """Images in [-1, 1] of the EMA model for sample ``indices`` (label i % classes,
        randomness seeded by (seed, i))."""
        raise NotImplementedError

    def sampling_description(self, sampling: dict | None = None) -> str:
        return ", ".join(f"{k} {v}" for k, v in {**self.sampling, **(sampling or {})}.items())


class TokenARSampler(GeneratorSampler):
    """Samples token indices from a ``diffusion.ar.ClassConditionalAR`` and decodes them."""

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


class LatentFlowSampler(GeneratorSampler):
    """Euler sampling of a ``LatentDiT`` in normalised latent space, denormalised with the
    per-channel statistics of the training latents."""

    def __init__(self, model: nn.Module, ema_decay: float = 0.9999, sampling: dict | None = None):
        super().__init__(model, ema_decay, sampling)
        self.register_latent_statistics()

    def register_latent_statistics(self) -> None:
        self.register_buffer("latent_mean", torch.zeros(self.model.in_channels))
        self.register_buffer("latent_std", torch.ones(self.model.in_channels))

    def set_latent_statistics(self, mean: Tensor, std: Tensor) -> None:
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def denormalize(self, latents: Tensor) -> Tensor:
        """Generator space -> the tokenizer's latent space (input of ``decode_latents``)."""
        return latents * self.latent_std.view(1, -1, 1, 1).to(latents) + self.latent_mean.view(1, -1, 1, 1).to(latents)

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
def build_model(fam: DictConfig, facts: dict[str, Any]) -> nn.Module:
    """The family's network (``generator.families.<family>.model``) shaped by the facts."""
    if facts["family"] == "latent_dit":
        c, h, _ = facts["latent_shape"]
        return instantiate(fam.model, in_channels=c, input_size=h, num_classes=facts["num_classes"])
    return instantiate(fam.model, vocab_sizes=list(facts["vocab_sizes"]),
                       positions=list(facts["token_shape"]), num_classes=facts["num_classes"])


def build_sampler(gcfg: DictConfig, facts: dict[str, Any]) -> GeneratorSampler:
    fam = gcfg.families[facts["family"]]
    kind = LatentFlowSampler if facts["family"] == "latent_dit" else TokenARSampler
    sampler = kind(build_model(fam, facts), ema_decay=fam.ema_decay,
                   sampling=OmegaConf.to_container(fam.sampling, resolve=True))
    sampler.facts = dict(facts)
    return sampler


def load_generator(path: str | os.PathLike) -> tuple[GeneratorSampler, DictConfig]:
    """(sampler with its EMA, statistics and facts; the run config) from a generator
    checkpoint written by ``python train.py experiment=generator``."""
    from common.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path)
    if "generator_facts" not in ckpt or "config" not in ckpt or "family" not in ckpt["generator_facts"]:
        raise KeyError(f"{path} is not a generator checkpoint of this version (no generator_facts.family / config). "
                       "Fix: pass a checkpoint written by `python train.py experiment=generator`.")
    cfg = OmegaConf.create(ckpt["config"])
    sampler = build_sampler(cfg.generator, ckpt["generator_facts"])
    sampler.load_state_dict(ckpt["state_dict"])
    sampler.facts["global_step"] = int(ckpt.get("global_step", -1))
    sampler.eval()
    return sampler, cfg
