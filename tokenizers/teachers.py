"""Frozen image teachers (DINOv2, CLIP) for semantic / alignment losses (SPEC.md §2, §3, §5).

``get_teacher(spec)`` builds a frozen timm ViT from a spec mapping
``{name, weights, random}`` (optionally ``image_size`` and ``weights_key``):

- ``name``: one of ``TEACHERS`` below (dinov2_s, dinov2_l, clip_b16, clip_l14);
- ``weights``: a local ``.safetensors`` / ``.pth`` / ``.bin`` file (timm's hub format,
  or the original DINOv2 / OpenAI-CLIP state dicts, which timm converts), or null to
  use the Hugging Face cache. The cache is only *read* (never a download: compute
  nodes often have no internet, and a hanging download would stall a whole job);
- ``random: true``: a small random ViT with the same interface, for smoke runs and
  tests (the name is kept for logging only);
- ``image_size`` (default 224): the side the teacher sees;
- ``weights_key``: the config key a user sets to fix missing weights (used in the
  error message only; default ``teacher.weights``).

Input handling lives here so no caller gets it wrong: images in [-1, 1] -> [0, 1] ->
bicubic resize with antialias to ``image_size`` (antialias matters when shrinking
256 -> 224) -> clamp to [0, 1] (bicubic overshoots) -> the teacher's own mean/std
(from timm's pretrained config: ImageNet statistics for DINOv2, OpenAI's for CLIP).

The outputs are the tokens after the ViT's final LayerNorm: ``cls`` (B, D) and
``patches`` (B, N, D) with class/register tokens dropped, on a ``grid`` (h, w).
For CLIP this is the 768/1024-wide token before CLIP's projection head (the
representation FQGAN's heads regress; the head's width equals it). A spec with
``final_norm: false`` takes the last block's output before that LayerNorm instead:
FQGAN's CLIP target (Hugging Face ``hidden_states[-1]``, where ``post_layernorm`` has
not run); its DINOv2 target is ``last_hidden_state``, after the norm. A spec's
``input_mode`` picks the preprocessing (``FrozenTeacher.preprocess``; FQGAN's reference
resizes with ``nearest``).

Teachers are cached by spec: every loss of a run that names the same teacher shares
one model. Tokenizers hold them through ``TeacherHandle`` so they are not
submodules: no EMA copy, not in checkpoints, not in the optimizer, not seen by DDP.
"""
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherInfo:
    architecture: str  # timm architecture name
    hf_hub_id: str  # where timm keeps the weights on the Hugging Face hub
    note: str = ""


# The OpenAI CLIP towers were trained with QuickGELU. timm's ``*_clip_quickgelu_224``
# architectures load the very same weight files (hub ids ``timm/vit_*_clip_224.openai``)
# with the original activation; the plain ``*_clip_224`` ones would use GELU and give
# slightly different features than the published model.
TEACHERS: dict[str, TeacherInfo] = {
    "dinov2_s": TeacherInfo("vit_small_patch14_dinov2", "timm/vit_small_patch14_dinov2.lvd142m"),
    "dinov2_l": TeacherInfo("vit_large_patch14_dinov2", "timm/vit_large_patch14_dinov2.lvd142m"),
    "clip_b16": TeacherInfo("vit_base_patch16_clip_quickgelu_224", "timm/vit_base_patch16_clip_224.openai"),
    "clip_l14": TeacherInfo("vit_large_patch14_clip_quickgelu_224", "timm/vit_large_patch14_clip_224.openai"),
}
# file names timm's hub repositories use, in the order timm itself tries them
_HUB_FILES = ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")

# the small random teacher: cheap on CPU, same interface (8x8 patch grid at 112 px)
RANDOM_TEACHER = dict(embed_dim=64, depth=2, num_heads=2, patch_size=14, image_size=112)
_RANDOM_SEED = 0  # + crc32(name): the same net in every process and DDP rank, a different one per name


@dataclass
class TeacherFeatures:
    cls: Tensor  # (B, D) class token after the final norm (before it with final_norm=False)
    patches: Tensor  # (B, N, D) patch tokens, prefix tokens dropped
    grid: tuple[int, int]  # (h, w) with h * w == N


class TeacherWeightsNotFound(FileNotFoundError):
    """Missing teacher weights; the message says which config key or cache path fixes it."""

    def __repr__(self) -> str:
        # Hydra's InstantiationException embeds repr(cause): keep the message readable there
        return f"{type(self).__name__}:\n{self}"


class FrozenTeacher(nn.Module):
    """A timm ViT that never trains: parameters frozen, always in eval mode, no grad."""

    def __init__(self, model: nn.Module, name: str, image_size: int, mean, std, random: bool = False):
        super().__init__()
        self.model = model
        self.name = name
        self.image_size = int(image_size)
        self.random = random
        self.embed_dim = int(model.embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # Lightning (and model.train()) on a parent would flip dropout / drop-path on:
        # a teacher stays in eval mode whatever its owner does.
        return super().train(False)

    @property
    def grid(self) -> tuple[int, int]:
        s = self.image_size // self.patch_size
        return (s, s)

    def preprocess(self, images: Tensor, input_mode: str = "normalized") -> Tensor:
        """[-1, 1] images -> the teacher's input at ``image_size``.

        ``normalized``: [0, 1], bicubic with antialias, clamp, the teacher's mean/std.
        ``normalized_nearest``: FQGAN's reference (its ``ScalingLayer``): [0, 1], nearest
        resize (``F.interpolate``'s default), the teacher's mean/std.
        ``raw_bilinear``: VA-VAE's reference (LightningDiT ``foundation_models.py``): the
        [-1, 1] images as they are, plain bilinear resize, no mean/std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Teacher '{self.name}' expects images (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}.")
        if input_mode == "raw_bilinear":
            x = images.float()
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            return x
        if input_mode not in ("normalized", "normalized_nearest"):
            raise ValueError(f"Teacher input_mode must be 'normalized', 'normalized_nearest' or 'raw_bilinear', "
                             f"got {input_mode!r}.")
        x = (images.float() + 1.0) / 2.0
        if input_mode == "normalized_nearest":
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="nearest")
        elif x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def tokens(self, x: Tensor, final_norm: bool = True) -> Tensor:
        """All tokens (prefix first) of the last block, after the final norm or before it."""
        if final_norm:
            return self.model.forward_features(x)
        (patches, prefix), = self.model.forward_intermediates(
            x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        return torch.cat([prefix, patches], dim=1)

    @torch.no_grad()
    def forward(self, images: Tensor, final_norm: bool = True, input_mode: str = "normalized") -> TeacherFeatures:
        tokens = self.tokens(self.preprocess(images, input_mode), final_norm)
        h, w = self.grid
        patches = tokens[:, self.num_prefix_tokens :]
        if patches.shape[1] != h * w:  # pragma: no cover - guards a misconfigured architecture
            raise RuntimeError(f"Teacher '{self.name}' returned {patches.shape[1]} patch tokens, expected {h}x{w}.")
        return TeacherFeatures(cls=tokens[:, 0], patches=patches, grid=(h, w))

    def extra_repr(self) -> str:
        return f"name={self.name}, image_size={self.image_size}, embed_dim={self.embed_dim}, random={self.random}"


# -- construction -----------------------------------------------------------------------------

_CACHE: dict[tuple, FrozenTeacher] = {}


def _spec_get(spec: Mapping[str, Any] | Any, key: str, default=None):
    try:
        value = spec.get(key, default)
    except AttributeError:
        value = getattr(spec, key, default)
    return default if value is None else value


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def _cache_key(spec) -> tuple:
    """("random", name, size) or ("pretrained", name, resolved weight file, size).

    Pretrained teachers are keyed by the file they load, so an explicit path and the HF
    cache entry it points to share one model. Resolving raises for missing weights."""
    name = str(_spec_get(spec, "name", "random"))
    random = _as_bool(_spec_get(spec, "random", False)) or name == "random"
    image_size = int(_spec_get(spec, "image_size", RANDOM_TEACHER["image_size"] if random else 224))
    if random:
        return ("random", name, image_size)
    if name not in TEACHERS:
        raise ValueError(
            f"Unknown teacher '{name}'.\n"
            f"Fix: set the teacher name to one of {sorted(TEACHERS)}, or teacher=random for a smoke test."
        )
    weights_key = str(_spec_get(spec, "weights_key", "teacher.weights"))
    path = resolve_weights(name, _spec_get(spec, "weights", None), weights_key)
    return ("pretrained", name, os.path.realpath(path), image_size)


def get_teacher(spec: Mapping[str, Any]) -> FrozenTeacher:
    """The frozen teacher for ``spec`` (built once per process, then shared)."""
    key = _cache_key(spec)
    if key not in _CACHE:
        kind, name, *rest = key
        if kind == "random":
            _CACHE[key] = build_random_teacher(name, rest[-1])
        else:
            _CACHE[key] = build_pretrained_teacher(name, rest[0], rest[1])
    return _CACHE[key]


def clear_cache() -> None:
    """Forget built teachers (tests; freeing memory between runs in one process)."""
    _CACHE.clear()


def hf_cache_dir() -> str:
    """The hub cache huggingface_hub would use, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def find_in_hf_cache(hf_hub_id: str) -> str | None:
    """The cached weight file of a hub repository, or None. Reads the cache only."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return None
    for filename in _HUB_FILES:
        found = try_to_load_from_cache(hf_hub_id, filename, cache_dir=hf_cache_dir())
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def missing_weights_message(name: str, weights: str | None, weights_key: str) -> str:
    info = TEACHERS[name]
    looked = f"{weights_key}={weights}" if weights else f"{weights_key}=null"
    return (
        f"Teacher weights for '{name}' not found.\n"
        f"Looked in: {looked}, HF cache {hf_cache_dir()}/models--{info.hf_hub_id.replace('/', '--')} (offline, never downloads).\n"
        f"Fix: download {info.hf_hub_id} (e.g. `huggingface-cli download {info.hf_hub_id} model.safetensors` "
        f"on a machine with internet) and set {weights_key}=/path/model.safetensors "
        f"(or point HF_HOME at a cache that holds it),\n"
        f"or run with teacher=random for a smoke test."
    )


def resolve_weights(name: str, weights: str | None, weights_key: str = "teacher.weights") -> str:
    """Path of the weight file for ``name``: the explicit file, else the HF cache."""
    if weights:
        path = os.path.expanduser(str(weights))
        if not os.path.isfile(path):
            raise TeacherWeightsNotFound(missing_weights_message(name, str(weights), weights_key))
        return path
    found = find_in_hf_cache(TEACHERS[name].hf_hub_id)
    if found is None:
        raise TeacherWeightsNotFound(missing_weights_message(name, None, weights_key))
    return found


def build_pretrained_teacher(name: str, path: str, image_size: int = 224) -> FrozenTeacher:
    import timm

    info = TEACHERS[name]
    # pretrained_cfg_overlay(file=...) makes timm load this exact file (no hub access) and
    # run its checkpoint filter: position embeddings are resampled to image_size (DINOv2
    # is published at 518 px) and original DINOv2 / OpenAI-CLIP key layouts are converted.
    try:
        model = timm.create_model(
            info.architecture,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=path),
            num_classes=0,
            img_size=image_size,
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"Teacher weights {path} do not fit '{name}' ({info.architecture}).\n"
            f"Fix: use the weights of {info.hf_hub_id}, or run with teacher=random for a smoke test.\n"
            f"timm said: {str(err).splitlines()[0]}"
        ) from err
    cfg = model.pretrained_cfg
    log.info("Teacher %s: %s from %s at %d px", name, info.architecture, path, image_size)
    return FrozenTeacher(model, name, image_size, cfg["mean"], cfg["std"])


def build_random_teacher(name: str = "random", image_size: int | None = None) -> FrozenTeacher:
    """A small randomly initialised ViT with the teacher interface, seeded from its name:
    identical in every process (DDP ranks agree on the targets), distinct between the
    teachers of one run (so two random 'semantic' branches get different targets)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models.vision_transformer import VisionTransformer

    image_size = int(image_size or RANDOM_TEACHER["image_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED + zlib.crc32(name.encode()))
        model = VisionTransformer(
            img_size=image_size,
            patch_size=RANDOM_TEACHER["patch_size"],
            embed_dim=RANDOM_TEACHER["embed_dim"],
            depth=RANDOM_TEACHER["depth"],
            num_heads=RANDOM_TEACHER["num_heads"],
            num_classes=0,
        )
    log.warning(
        "Using a RANDOM teacher in place of '%s' (teacher.random=true): its features are meaningless, "
        "for smoke tests only.",
        name,
    )
    return FrozenTeacher(model, name, image_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, random=True)


# -- holding a teacher without owning it --------------------------------------------------------


class TeacherHandle:
    """Holds a shared ``FrozenTeacher`` outside the module tree of its owner.

    As a plain attribute (not an ``nn.Module``) the teacher is not a submodule: it is
    not in the owner's ``state_dict`` (checkpoints), ``parameters()`` (optimizer, DDP),
    and ``copy.deepcopy`` (the EMA model) shares it instead of copying it. Pickling
    (e.g. spawned DDP workers) rebuilds it from its spec. On call it is moved to the
    input's device.

    ``lazy=False`` (training) builds the teacher now, so missing weights stop a run at
    model construction; ``lazy=True`` (rebuilding a tokenizer to encode/decode) loads it
    at the first call, and ``embed_dim`` comes from the architecture alone.
    """

    def __init__(self, spec: Mapping[str, Any], lazy: bool = False):
        self.spec = _plain(spec)
        self._teacher: FrozenTeacher | None = None if lazy else get_teacher(self.spec)

    @property
    def teacher(self) -> FrozenTeacher:
        if self._teacher is None:
            self._teacher = get_teacher(self.spec)
        return self._teacher

    @property
    def loaded(self) -> bool:
        return self._teacher is not None

    @property
    def embed_dim(self) -> int:
        return self._teacher.embed_dim if self._teacher is not None else teacher_embed_dim(self.spec)

    def to(self, device: torch.device | str) -> "TeacherHandle":
        if self._teacher is not None:
            self._teacher.to(device)
        return self

    def __call__(self, images: Tensor, **options) -> TeacherFeatures:
        teacher = self.teacher
        if teacher.mean.device != images.device:
            teacher.to(images.device)
        options.setdefault("final_norm", _as_bool(self.spec.get("final_norm", True)))
        if self.spec.get("input_mode"):
            options.setdefault("input_mode", str(self.spec["input_mode"]))
        return teacher(images, **options)

    def __deepcopy__(self, memo) -> "TeacherHandle":
        return self  # frozen and shared: an EMA copy uses the same teacher

    def __copy__(self) -> "TeacherHandle":
        return self

    def __getstate__(self):
        return {"spec": self.spec, "lazy": self._teacher is None}

    def __setstate__(self, state):
        self.__init__(state["spec"], lazy=state.get("lazy", False))

    def __repr__(self) -> str:
        if self._teacher is None:
            return f"TeacherHandle(name={self.spec.get('name')}, not loaded)"
        return f"TeacherHandle({self._teacher.extra_repr()})"


def teacher_embed_dim(spec: Mapping[str, Any]) -> int:
    """Token width of the teacher a spec names, without loading any weights (the
    architecture is built on the meta device)."""
    name = str(_spec_get(spec, "name", "random"))
    if _as_bool(_spec_get(spec, "random", False)) or name == "random":
        return int(RANDOM_TEACHER["embed_dim"])
    if name not in TEACHERS:
        raise ValueError(
            f"Unknown teacher '{name}'.\n"
            f"Fix: set the teacher name to one of {sorted(TEACHERS)}, or teacher=random for a smoke test."
        )
    import timm

    with torch.device("meta"):
        model = timm.create_model(TEACHERS[name].architecture, pretrained=False, num_classes=0)
    return int(model.embed_dim)


def _plain(spec) -> dict:
    """A plain dict copy of a spec (DictConfig or mapping), interpolations resolved."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(spec, DictConfig):
            return dict(OmegaConf.to_container(spec, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    return dict(spec)
