"""FlexTok-FSQ: 1D variable-length tokens with a rectified-flow decoder (SPEC.md §5).

Pipeline (training, ``forward``)::

    images -> frozen VAE (fp32, no grad) -> latent x0 (B, C, h, w), times latent_scale
    encoder:  2x2 patches -> linear -> + fixed 2D sin-cos ; R learned registers appended;
              mask: patches see patches, register i sees all patches and registers 0..i;
              register outputs -> LayerNorm -> zero-init linear -> 6 values -> FSQ [8,8,8,5,5,5]
    decoder:  [noised latent patches x_t, register tokens (linear 6 -> width + learned
              position)], full attention, adaLN-Zero on t (separate modulation for
              patches and registers); nested dropout then replaces registers >= k by one
              learned mask token; with probability ``cfg_dropout`` all registers become
              a learned null token (or zeros) (the unconditional branch for guidance)
    layout:   as Apple's reference (github.com/apple/ml-flextok), so its released weights
              load exactly (``tokenizers.pretrained.flextok``): LayerNorm eps 1e-5 without
              affine (also as QK-norm), no linear biases in the blocks, SwiGLU, attention
              scale 8 / head_dim, timestep features with max_period 256
    losses:   flow = MSE(v, eps - x0) with x_t = t eps + (1 - t) x0 (t = 0 data, t = 1
              noise: ``diffusion.flow``), t logit-normal; repa = 1 - cos(proj(decoder
              patch features after block ``repa_layer``), teacher patch features resized
              to the patch grid), both returned already weighted.

``forward`` returns ``reconstruction=None`` (the loop then skips pixel, perceptual and
GAN terms) and ``latents=None``. ``encode(images)`` gives (B, R) int64 FSQ indices;
``decode(tokens, num_tokens=k, steps, guidance, guidance_interval, shift)`` samples
images from the first k of them, for any k in 1..R (defaults as the reference: 20 Euler
steps, guidance 7.5 with norm-guided CFG / APG, noise from a generator seeded with
``decode_seed``); ``reconstruct_at(images, token_counts)`` does it for several k with the
same noise (the image-grid callback).

``encode_latents`` / ``decode_latents`` raise NotImplementedError on purpose: FlexTok's
tokens are a 1D sequence, so latent-space regularisers and the spatial latent generator
do not apply to it (regularizer=none).

The VAE is held OUTSIDE the module tree (``FrozenLatentCodec``): it is not trained, not
in the optimizer, not copied into the EMA model and not saved in FlexTok checkpoints;
``vae_ckpt`` (saved in the run config) is read again whenever the tokenizer is rebuilt,
so keep that file. Without ``vae_ckpt`` a parameter-free pixel-unshuffle stand-in is
used, only if ``allow_stand_in=true`` (debug=smoke sets it), with a warning. ``vae=`` takes
a built VAE instead (``load_pretrained`` passes the released one).

The REPA teacher is likewise held outside the module tree (``TeacherHandle``); besides a
teacher spec mapping ({name, weights, random}) the constructor accepts any frozen
callable with ``embed_dim`` returning ``.patches`` and ``.grid`` (tests pass a fake).
``load_teachers=false`` (set by ``tokenizers.loading.load_tokenizer``) defers loading
the teacher's weights to its first use, so checkpoints rebuild for encode / decode on
machines without them.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion import flow
from diffusion.blocks import Block, FinalLayer, TimestepEmbedder, make_norm, patchify, prefix_causal_mask, sincos_2d, unpatchify
from tokenizers.contract import Tokenizer, TokenizerOutput
from tokenizers.fsq import FSQ

log = logging.getLogger(__name__)

NESTED_DROPOUT_MODES = ("uniform", "pow2", "pow2_round", "none")
NULL_CONDITIONS = ("learned", "zero")
NORM_EPS = 1e-5  # the reference's LayerNorm default


# -- nested dropout -------------------------------------------------------------------------
def powers_of_two_up_to(n: int) -> list[int]:
    """1, 2, 4, ... <= n, plus n itself when n is not a power of two."""
    values = [2**i for i in range(int(math.log2(n)) + 1)]
    return values if values[-1] == n else values + [n]


def sample_keep_counts(batch_size: int, num_registers: int, mode: str = "pow2",
                       device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """How many registers each sample keeps, (B,) int64 in 1..R.

    - ``uniform``: k ~ U{1..R}
    - ``pow2``: k uniform over the powers of two {1, 2, 4, ..., R}
    - ``pow2_round``: k ~ U{1..R} rounded up to the next power of two (capped at R)
    - ``none``: k = R (no nested dropout)
    """
    r = num_registers
    if mode == "uniform":
        return torch.randint(1, r + 1, (batch_size,), device=device, generator=generator)
    if mode == "pow2":
        choices = torch.tensor(powers_of_two_up_to(r), device=device)
        return choices[torch.randint(len(choices), (batch_size,), device=device, generator=generator)]
    if mode == "pow2_round":
        k = torch.randint(1, r + 1, (batch_size,), device=device, generator=generator)
        rounded = torch.pow(2, torch.ceil(torch.log2(k.double()))).long()
        return rounded.clamp(max=r)
    if mode == "none":
        return torch.full((batch_size,), r, device=device, dtype=torch.long)
    raise ValueError(f"nested_dropout={mode!r} is not known; use one of {NESTED_DROPOUT_MODES}.")


def apply_nested_dropout(tokens: Tensor, keep: Tensor, mask_token: Tensor) -> Tensor:
    """Replace tokens (B, R, D) at positions >= keep[b] by ``mask_token`` (D,)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    dropped = positions[None, :] >= keep[:, None]  # (B, R)
    return torch.where(dropped[..., None], mask_token.to(tokens.dtype), tokens)


# -- the frozen latent space underneath ------------------------------------------------------
class FrozenLatentCodec:
    """The frozen VAE (or the stand-in) FlexTok tokenizes the latents of.

    Deliberately not an ``nn.Module`` attribute of FlexTok: no EMA copy (``deepcopy``
    shares it), no optimizer, no checkpoint entry. Runs in fp32 with autocast off and
    without gradients, on the device of its input.
    """

    def __init__(self, vae: nn.Module | None = None, stand_in_downsample: int = 8, source: str = ""):
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.stand_in_downsample = stand_in_downsample
        self.source = source

    @property
    def is_stand_in(self) -> bool:
        return self.vae is None

    def latent_channels_and_downsample(self, image_size: int) -> tuple[int, int]:
        if self.vae is None:
            return 3 * self.stand_in_downsample**2, self.stand_in_downsample
        c, h, _ = self.vae.latent_shape(image_size)
        return int(c), image_size // int(h)

    def _ready(self, device: torch.device) -> None:
        if self.vae is not None:
            first = next(iter(self.vae.parameters()), None)
            if first is not None and (first.device != device or first.dtype != torch.float32):
                self.vae.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            images = images.float()
            if self.vae is None:
                return F.pixel_unshuffle(images, self.stand_in_downsample)
            self._ready(images.device)
            return self.vae.encode_latents(images).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        with torch.autocast(device_type=latents.device.type, enabled=False):
            latents = latents.float()
            if self.vae is None:
                return F.pixel_shuffle(latents, self.stand_in_downsample)
            self._ready(latents.device)
            return self.vae.decode_latents(latents).float()

    def __deepcopy__(self, memo) -> "FrozenLatentCodec":
        return self  # frozen and shared with the EMA copy

    def __repr__(self) -> str:
        return f"FrozenLatentCodec({'stand-in pixel_unshuffle x%d' % self.stand_in_downsample if self.vae is None else self.source})"


def load_latent_codec(vae_ckpt: str | None, allow_stand_in: bool, stand_in_downsample: int) -> FrozenLatentCodec:
    if vae_ckpt:
        from tokenizers.loading import load_tokenizer

        vae, _ = load_tokenizer(vae_ckpt)
        if not hasattr(vae, "encode_latents") or not hasattr(vae, "latent_shape"):
            raise TypeError(f"tokenizer.vae_ckpt={vae_ckpt} holds a {type(vae).__name__}, which has no "
                            "encode_latents / latent_shape. Fix: point it at a tokenizer=vae checkpoint.")
        log.info("FlexTok: frozen VAE %s from %s", type(vae).__name__, vae_ckpt)
        return FrozenLatentCodec(vae, source=str(vae_ckpt))
    if not allow_stand_in:
        raise ValueError(
            "FlexTok needs a frozen VAE: tokenizer.vae_ckpt is null.\n"
            "Fix: train one with `python train.py tokenizer=vae ...` and set "
            "tokenizer.vae_ckpt=<run dir>/checkpoints/last.ckpt, or (smoke tests only) run with debug=smoke, "
            "which sets tokenizer.allow_stand_in=true."
        )
    log.warning("FlexTok: tokenizer.vae_ckpt is null, using a parameter-free pixel-unshuffle x%d STAND-IN for the "
                "VAE (allow_stand_in=true). Smoke tests only: results are not FlexTok's.", stand_in_downsample)
    return FrozenLatentCodec(None, stand_in_downsample)


class _HeldTeacher:
    """Holds a user-given teacher module outside the module tree (tests, custom teachers)."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.embed_dim = int(teacher.embed_dim)

    def __call__(self, images: Tensor):
        if isinstance(self.teacher, nn.Module):
            first = next(iter(self.teacher.buffers()), next(iter(self.teacher.parameters()), None))
            if first is not None and first.device != images.device:
                self.teacher.to(images.device)
        return self.teacher(images)

    def __deepcopy__(self, memo) -> "_HeldTeacher":
        return self


def hold_teacher(teacher, lazy: bool = False):
    """A spec mapping -> ``TeacherHandle`` (lazy: weights loaded at the first call, the
    width read from the architecture); a ready teacher object -> held as is."""
    if isinstance(teacher, Mapping) or type(teacher).__name__ == "DictConfig":
        from tokenizers.teachers import TeacherHandle

        return TeacherHandle(teacher, lazy=lazy)
    return _HeldTeacher(teacher)


# -- encoder and decoder -----------------------------------------------------------------------
def reference_block(width: int, head_dim: int, mlp_ratio: float, **conditioning) -> Block:
    """A transformer block as FlexTok's reference builds it: LayerNorm (eps 1e-5, no affine,
    no bias) also as QK-norm, no linear biases, SwiGLU, muP attention scale 8 / head_dim."""
    return Block(width, width // head_dim, mlp_ratio, norm="layernorm", norm_affine=False, qk_norm=True,
                 bias=False, norm_eps=NORM_EPS, attn_scale=8.0 / head_dim, qk_norm_affine=False, **conditioning)


class FlexTokEncoder(nn.Module):
    """Latent patches + registers -> one ``code_dim`` vector per register (before FSQ)."""

    def __init__(self, in_channels: int, patch_size: int = 2, width: int = 768, depth: int = 12,
                 head_dim: int = 64, num_registers: int = 256, code_dim: int = 6, mlp_ratio: float = 4.0):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"encoder width {width} is not divisible by head_dim {head_dim}.")
        self.patch_size, self.width, self.num_registers = patch_size, width, num_registers
        self.patch_embed = nn.Linear(in_channels * patch_size**2, width)
        self.registers = nn.Parameter(torch.randn(num_registers, width) * 0.02)
        self.blocks = nn.ModuleList(reference_block(width, head_dim, mlp_ratio) for _ in range(depth))
        self.norm = make_norm("layernorm", width, affine=False, eps=NORM_EPS)
        self.head = nn.Linear(width, code_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def input_tokens(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) -> the initial sequence [patches + sin-cos, registers], (B, N + R, width)."""
        b, _, h, w = latents.shape
        p = self.patch_size
        patches = self.patch_embed(patchify(latents, p).to(self.patch_embed.weight.dtype))
        patches = patches + sincos_2d(self.width, h // p, w // p, patches.device).to(patches.dtype)
        return torch.cat([patches, self.registers.to(patches.dtype).expand(b, -1, -1)], dim=1)

    def transformer(self, tokens: Tensor, num_patches: int) -> Tensor:
        """Run the blocks under the patch / causal-register mask; returns the whole sequence."""
        mask = prefix_causal_mask(num_patches, tokens.shape[1] - num_patches, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, mask=mask)
        return tokens

    def forward(self, latents: Tensor) -> Tensor:
        tokens = self.input_tokens(latents)
        num_patches = tokens.shape[1] - self.num_registers
        registers = self.transformer(tokens, num_patches)[:, num_patches:]
        with torch.autocast(device_type=registers.device.type, enabled=False):  # the FSQ input in fp32
            return self.head(self.norm(registers.float()))


class FlexTokDecoder(nn.Module):
    """Rectified-flow transformer: (x_t, t, register codes) -> velocity (B, C, h, w)."""

    def __init__(self, latent_channels: int, patch_size: int = 2, width: int = 768, depth: int = 12,
                 head_dim: int = 64, num_registers: int = 256, code_dim: int = 6, mlp_ratio: float = 4.0,
                 separate_register_modulation: bool = True, null_condition: str = "learned",
                 time_max_period: float = 256.0, time_scale: float = 1000.0):
        super().__init__()
        if width % head_dim:
            raise ValueError(f"decoder width {width} is not divisible by head_dim {head_dim}.")
        if null_condition not in NULL_CONDITIONS:
            raise ValueError(f"null_condition={null_condition!r} is not known; use one of {NULL_CONDITIONS}.")
        self.patch_size, self.width, self.num_registers = patch_size, width, num_registers
        self.latent_channels = latent_channels
        self.patch_embed = nn.Linear(latent_channels * patch_size**2, width)
        self.register_embed = nn.Linear(code_dim, width)
        self.register_pos = nn.Parameter(torch.randn(num_registers, width) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)  # nested dropout
        # unconditional branch (CFG): a learned token in every register slot, or zeros
        self.null_token = nn.Parameter(torch.randn(width) * 0.02) if null_condition == "learned" else None
        self.t_embed = TimestepEmbedder(width, max_period=time_max_period, time_scale=time_scale)
        self.blocks = nn.ModuleList(
            reference_block(width, head_dim, mlp_ratio, cond_dim=width,
                            adaln_groups=2 if separate_register_modulation else 1)
            for _ in range(depth)
        )
        self.final = FinalLayer(width, latent_channels * patch_size**2, cond_dim=width, norm_eps=NORM_EPS)

    def register_tokens(self, codes: Tensor, keep: Tensor, null: Tensor) -> Tensor:
        """FSQ codes (B, R, code_dim) -> register tokens: embedded plus their position, then
        (as in the reference, after the position) nested dropout and the null condition."""
        tokens = self.register_embed(codes.to(self.register_embed.weight.dtype))
        tokens = tokens + self.register_pos.to(tokens.dtype)
        tokens = apply_nested_dropout(tokens, keep, self.mask_token)
        null_token = self.null_token if self.null_token is not None else tokens.new_zeros(self.width)
        return torch.where(null[:, None, None], null_token.to(tokens.dtype), tokens)

    def forward(self, x_t: Tensor, t: Tensor, codes: Tensor, keep: Tensor, null: Tensor,
                features_at: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Velocity, and the patch tokens after block ``features_at`` (1-based; REPA) or None."""
        b, c, h, w = x_t.shape
        p = self.patch_size
        patches = self.patch_embed(patchify(x_t, p).to(self.patch_embed.weight.dtype))
        patches = patches + sincos_2d(self.width, h // p, w // p, patches.device).to(patches.dtype)
        n = patches.shape[1]
        x = torch.cat([patches, self.register_tokens(codes, keep, null)], dim=1)
        cond = self.t_embed(t)
        segments = (n, self.num_registers)  # used when patches and registers get their own adaLN modulation
        features = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, cond=cond, segments=segments)
            if i == features_at:
                features = x[:, :n]
        out = self.final(x[:, :n], cond)
        return unpatchify(out, p, c, h, w), features


def repa_projector(width: int, hidden: int, out_dim: int) -> nn.Sequential:
    """REPA's MLP (Linear, SiLU, Linear, SiLU, Linear); the output layer starts at zero."""
    mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, out_dim))
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


def resize_teacher_patches(patches: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Teacher tokens (B, h*w, D) on ``grid`` -> (B, H*W, D) on ``size`` (bilinear, antialiased)."""
    if tuple(grid) == tuple(size):
        return patches
    b, _, d = patches.shape
    maps = patches.transpose(1, 2).reshape(b, d, *grid).float()
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=True)
    return maps.flatten(2).transpose(1, 2)


def repa_alignment(projected: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, mean cosine) between projected decoder features and teacher features.

    loss = 1 - mean(<p / max(|p|, 1), t / |t|>): the cosine once |p| >= 1. The floor of 1
    on the norm keeps the gradient bounded while the zero-initialised projector output is
    still near zero (a plain cosine has gradient ~1/|p| there, which would dominate the
    global gradient-norm clip); the logged cosine is the true one."""
    p, t = projected.float(), F.normalize(target.float(), dim=-1)
    floored = p / p.norm(dim=-1, keepdim=True).clamp_min(1.0)
    loss = 1 - (floored * t).sum(-1).mean()
    cosine = F.cosine_similarity(p.detach(), t, dim=-1).mean()
    return loss, cosine


# -- the tokenizer -------------------------------------------------------------------------------
class FlexTok(Tokenizer):
    discrete = True
    reconstructs_in_training = False  # the flow decoder trains on velocities, not pixels

    def __init__(
        self,
        vae_ckpt: str | None = None,
        allow_stand_in: bool = False,
        stand_in_downsample: int = 8,
        image_size: int = 256,
        latent_scale: float | None = None,
        latent_shift: float = 0.0,
        patch_size: int = 2,
        num_registers: int = 256,
        fsq_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5),
        encoder_width: int = 768,
        encoder_depth: int = 12,
        decoder_width: int = 768,
        decoder_depth: int = 12,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        separate_register_modulation: bool = True,
        null_condition: str = "learned",
        time_max_period: float = 256.0,
        time_scale: float = 1000.0,
        nested_dropout: str = "pow2",
        cfg_dropout: float = 0.1,
        time_mean: float = 0.0,
        time_std: float = 1.0,
        flow_weight: float = 1.0,
        teacher: Any = None,
        load_teachers: bool = True,
        repa_weight: float = 0.5,
        repa_layer: int = 2,
        repa_hidden: int = 2048,
        decode_steps: int = 20,
        decode_guidance: float = 7.5,
        decode_guidance_method: str = "apg",
        decode_guidance_interval: tuple[float, float] = (0.0, 1.0),
        decode_shift: float = 1.0,
        decode_seed: int | None = 0,
        vae: nn.Module | None = None,
    ):
        super().__init__()
        if nested_dropout not in NESTED_DROPOUT_MODES:
            raise ValueError(f"nested_dropout={nested_dropout!r} is not known; use one of {NESTED_DROPOUT_MODES}.")
        if decode_guidance_method not in flow.GUIDANCE_METHODS:
            raise ValueError(f"decode_guidance_method={decode_guidance_method!r} is not known; "
                             f"use one of {flow.GUIDANCE_METHODS}.")
        if vae is not None:  # a built VAE (load_pretrained); vae_ckpt is then ignored
            self.codec = FrozenLatentCodec(vae, source=f"given {type(vae).__name__}")
        else:
            self.codec = load_latent_codec(vae_ckpt, allow_stand_in, stand_in_downsample)
        self.image_size = int(image_size)
        latent_channels, self.downsample = self.codec.latent_channels_and_downsample(self.image_size)
        if (self.image_size // self.downsample) % patch_size:
            raise ValueError(f"latent grid {self.image_size // self.downsample} (image_size={image_size}, "
                             f"downsample {self.downsample}) is not divisible by patch_size={patch_size}.")
        self.latent_channels = latent_channels
        token_dim = latent_channels * patch_size**2
        if token_dim > decoder_width:
            # The velocity eps - x0 contains the full-rank noise of every patch token: a
            # decoder narrower than a token cannot pass it through, and the flow loss
            # plateaus near (1 - width / token_dim) of the noise variance.
            log.warning("FlexTok: a latent patch has %d values but decoder_width is %d: the decoder cannot "
                        "represent the velocity. Fix: decoder_width >= %d, or a smaller patch_size / "
                        "stand_in_downsample.", token_dim, decoder_width, token_dim)
        # x0 = (VAE latent - shift) * scale. The scale is the VAE's (FlexTok's reference
        # multiplies by the VAE config's scaling_factor); None: measured as 1 / std of the
        # first batch encoded (then saved with the checkpoint, a buffer).
        self.latent_shift = float(latent_shift)
        self.register_buffer("latent_scale", torch.tensor(math.nan if latent_scale is None else float(latent_scale)))
        self.patch_size, self.num_registers = patch_size, num_registers
        self.fsq = FSQ(fsq_levels)
        self.codebook_sizes = (self.fsq.codebook_size,)
        self.encoder = FlexTokEncoder(latent_channels, patch_size, encoder_width, encoder_depth, head_dim,
                                      num_registers, self.fsq.dim, mlp_ratio)
        self.decoder = FlexTokDecoder(latent_channels, patch_size, decoder_width, decoder_depth, head_dim,
                                      num_registers, self.fsq.dim, mlp_ratio, separate_register_modulation,
                                      null_condition, time_max_period, time_scale)
        self.nested_dropout, self.cfg_dropout = nested_dropout, float(cfg_dropout)
        self.time_mean, self.time_std = float(time_mean), float(time_std)
        self.flow_weight = float(flow_weight)

        self.repa_weight, self.repa_layer = float(repa_weight), int(repa_layer)
        self.teacher = None
        self.repa_projector = None
        if self.repa_weight > 0:
            if teacher is None:
                raise ValueError("repa_weight > 0 needs a teacher. Fix: set tokenizer.teacher=${teacher} "
                                 "(teacher=random for smoke tests) or tokenizer.repa_weight=0.")
            if not 1 <= self.repa_layer <= decoder_depth:
                raise ValueError(f"repa_layer={repa_layer} must lie in 1..decoder_depth={decoder_depth}.")
            self.teacher = hold_teacher(teacher, lazy=not load_teachers)
            self.repa_projector = repa_projector(decoder_width, repa_hidden, self.teacher.embed_dim)

        self.decode_steps, self.decode_guidance = int(decode_steps), float(decode_guidance)
        self.decode_guidance_method = decode_guidance_method
        self.decode_guidance_interval = tuple(float(v) for v in decode_guidance_interval)
        self.decode_shift = float(decode_shift)
        self.decode_seed = decode_seed
        self._noise_generator: torch.Generator | None = None  # decode noise, seeded by decode_seed

    # -- latents ---------------------------------------------------------------------------
    def images_to_latents(self, images: Tensor) -> Tensor:
        """Frozen VAE latents, shifted and scaled to roughly unit variance (fp32)."""
        shifted = self.codec.encode(images) - self.latent_shift
        if torch.isnan(self.latent_scale):
            variance = shifted.float().var()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(variance)  # every rank the same scale
                variance /= torch.distributed.get_world_size()
            measured = float(variance.clamp_min(1e-12).rsqrt())
            self.latent_scale.fill_(measured)
            log.info("FlexTok: latent_scale measured on the first batch (%d images): %.5f", images.shape[0], measured)
        return shifted * self.latent_scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before latent_scale was a buffer: keep the value the config gave
        state_dict.setdefault(prefix + "latent_scale", self.latent_scale.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def latents_to_images(self, latents: Tensor) -> Tensor:
        if torch.isnan(self.latent_scale):
            raise ValueError("FlexTok.latent_scale is not known yet (latent_scale=null is measured on the first "
                             "encoded batch). Fix: encode images first, or set tokenizer.latent_scale.")
        return self.codec.decode(latents.float() / self.latent_scale + self.latent_shift).clamp(-1, 1)

    def quantize(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Latents -> (FSQ codes (B, R, 6) fp32, indices (B, R) int64)."""
        return self.fsq(self.encoder(latents))

    # -- training --------------------------------------------------------------------------
    def forward(self, images: Tensor) -> TokenizerOutput:
        x0 = self.images_to_latents(images)
        codes, indices = self.quantize(x0)
        b, device = x0.shape[0], x0.device
        if self.training:
            keep = sample_keep_counts(b, self.num_registers, self.nested_dropout, device=device)
            null = torch.rand(b, device=device) < self.cfg_dropout
        else:
            keep = torch.full((b,), self.num_registers, dtype=torch.long, device=device)
            null = torch.zeros(b, dtype=torch.bool, device=device)

        t = flow.sample_time(b, device=device, mean=self.time_mean, std=self.time_std)
        eps = torch.randn_like(x0)
        x_t = flow.interpolate(x0, eps, t)
        features_at = self.repa_layer if self.repa_projector is not None else None
        velocity, features = self.decoder(x_t, t, codes, keep, null, features_at=features_at)
        flow_mse = flow.flow_loss(velocity, flow.velocity_target(x0, eps))

        losses = {"flow": self.flow_weight * flow_mse}
        logs: dict[str, Tensor | float] = {
            "flow_mse": flow_mse.detach(),
            "fsq_batch_usage": indices.unique().numel() / min(indices.numel(), self.fsq.codebook_size),
            "keep_mean": keep.float().mean(),
        }
        if self.repa_projector is not None:
            teacher_out = self.teacher(images)
            grid = (x0.shape[-2] // self.patch_size, x0.shape[-1] // self.patch_size)
            target = resize_teacher_patches(teacher_out.patches.detach(), tuple(teacher_out.grid), grid)
            repa, cosine = repa_alignment(self.repa_projector(features), target)
            losses["repa"] = self.repa_weight * repa
            logs["repa_cos"] = cosine
        return TokenizerOutput(reconstruction=None, losses=losses, logs=logs, latents=None)

    # -- tokens ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> (B, R) int64 FSQ indices (coarse-to-fine order)."""
        return self.quantize(self.images_to_latents(images))[1]

    @torch.no_grad()
    def decode(self, tokens: Tensor, num_tokens: int | None = None, steps: int | None = None,
               guidance: float | None = None, guidance_interval: tuple[float, float] | None = None,
               shift: float | None = None, image_size: int | None = None, noise: Tensor | None = None,
               generator: torch.Generator | None = None, guidance_method: str | None = None) -> Tensor:
        """Sample images from the first ``num_tokens`` tokens (default: all given).

        ``tokens`` (B, L) int64 with 1 <= L <= R (a prefix is enough); ``noise`` the
        starting latent (B, C, h, w) at t = 1, else drawn on the CPU from ``generator`` or,
        without one, from this tokenizer's generator seeded with ``decode_seed`` (so an
        evaluation draws the same noise run to run; ``decode_seed=None``: the global RNG).
        ``guidance_method``: ``apg`` (the reference's norm-guided CFG) or ``cfg``. Unset
        options take the ``decode_*`` constructor defaults (the reference's: 20 steps,
        guidance 7.5, APG)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.num_registers or tokens.shape[1] < 1:
            raise ValueError(f"FlexTok.decode expects tokens (B, L) with 1 <= L <= {self.num_registers}, "
                             f"got {tuple(tokens.shape)}.")
        k = tokens.shape[1] if num_tokens is None else int(num_tokens)
        if not 1 <= k <= tokens.shape[1]:
            raise ValueError(f"num_tokens={num_tokens} must lie in 1..{tokens.shape[1]} (the tokens given).")
        steps = self.decode_steps if steps is None else steps
        guidance = self.decode_guidance if guidance is None else float(guidance)
        interval = self.decode_guidance_interval if guidance_interval is None else tuple(guidance_interval)
        shift = self.decode_shift if shift is None else shift
        method = self.decode_guidance_method if guidance_method is None else guidance_method
        if method not in flow.GUIDANCE_METHODS:
            raise ValueError(f"guidance_method={method!r} is not known; use one of {flow.GUIDANCE_METHODS}.")
        b, device = tokens.shape[0], tokens.device

        codes = self.fsq.indices_to_codes(tokens)
        if codes.shape[1] < self.num_registers:  # the padding is masked out by keep = k anyway
            codes = F.pad(codes, (0, 0, 0, self.num_registers - codes.shape[1]))
        if noise is None:
            size = (image_size or self.image_size) // self.downsample
            if generator is None and self.decode_seed is not None:
                if self._noise_generator is None:
                    self._noise_generator = torch.Generator().manual_seed(int(self.decode_seed))
                generator = self._noise_generator
            on = generator.device if generator is not None else device
            noise = torch.randn((b, self.latent_channels, size, size), device=on, generator=generator).to(device)
        keep = torch.full((b,), k, dtype=torch.long, device=device)
        cond_null = torch.zeros(b, dtype=torch.bool, device=device)
        guide = flow.NormGuidance() if method == "apg" else flow.guide  # APG keeps state over the steps

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            if guidance == 1.0 or not flow.in_guidance_interval(float(t[0]), interval):
                return self.decoder(x, t, codes, keep, cond_null)[0]
            both, _ = self.decoder(torch.cat([x, x]), torch.cat([t, t]), torch.cat([codes, codes]),
                                   torch.cat([keep, keep]), torch.cat([cond_null, ~cond_null]))
            cond, uncond = both.chunk(2)
            return guide(cond, uncond, guidance)

        latents = flow.euler_sample(velocity, noise.float(), steps=steps, shift=shift)
        return self.latents_to_images(latents)

    @torch.no_grad()
    def reconstruct_at(self, images: Tensor, token_counts=(1, 4, 16, 64, 256), steps: int | None = None,
                       guidance: float | None = None, seed: int = 0) -> dict[int, Tensor]:
        """{k: images decoded from the first k tokens} for each k <= R, all from the same noise."""
        tokens = self.encode(images)
        counts = sorted({int(k) for k in token_counts if 1 <= int(k) <= self.num_registers}) or [self.num_registers]
        generator = torch.Generator(device="cpu").manual_seed(seed)
        h, w = images.shape[-2] // self.downsample, images.shape[-1] // self.downsample
        noise = torch.randn((images.shape[0], self.latent_channels, h, w), generator=generator).to(images.device)
        return {k: self.decode(tokens, num_tokens=k, steps=steps, guidance=guidance, noise=noise) for k in counts}

    # -- contract ----------------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        raise NotImplementedError(
            "FlexTok has no spatial latent: its tokens are a 1D sequence (encode -> (B, R) indices, "
            "decode(tokens, num_tokens=k)). Latent-space regularisers and the spatial latent generator "
            "do not apply; use regularizer=none.")

    def decode_latents(self, latents: Tensor) -> Tensor:
        raise NotImplementedError(
            "FlexTok has no spatial latent to decode; use decode(tokens, num_tokens=k, steps=..., guidance=...).")

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        raise NotImplementedError("FlexTok has no spatial latent; token_shape(image_size) gives (R,).")

    def decoder_last_layer(self) -> Tensor:
        return self.decoder.final.linear.weight

    def encoder_last_layer(self) -> Tensor:
        return self.encoder.head.weight

    def token_shape(self, image_size: int) -> tuple[int, ...]:
        return (self.num_registers,)
