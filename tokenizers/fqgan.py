"""FQGAN: factorized quantization with k sub-codebooks (dual k=2, triple k=3), SPEC.md §2.

Built from the very pieces VQGAN uses (``conv.Encoder`` trunk, ``conv.Decoder``,
``quantizers.VectorQuantizer``), so a comparison with the baseline changes only what
the paper changes:

    images -> Encoder.trunk (shared, incl. middle block)
           -> per branch: adapter (pos-emb + transformer + norm + conv) -> 1x1 -> own VQ
           -> concat of the k quantized maps -> 1x1 -> shared Decoder

plus a disentanglement loss between the branches' quantized vectors and, on the
semantic branches, a representation head trained by in-batch InfoNCE against a
frozen teacher's class token.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from tokenizers.contract import Tokenizer, TokenizerOutput
from tokenizers.conv import Decoder, Encoder, group_norm
from tokenizers.quantizers import VectorQuantizer
from tokenizers.teachers import TeacherHandle


# -- losses ------------------------------------------------------------------------------------


def branch_cos2(a: Tensor, b: Tensor) -> Tensor:
    """Mean over tokens of the squared cosine between two (B, D, H, W) maps."""
    if a.shape != b.shape:
        raise ValueError(
            f"Disentanglement compares branch vectors token by token; got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}. Fix: give every branch the same code_dim."
        )
    cos = (F.normalize(a.float(), dim=1) * F.normalize(b.float(), dim=1)).sum(1)
    return cos.pow(2).mean()


def disentanglement_loss(quantized: Sequence[Tensor]) -> Tensor:
    """SPEC §2: per token, the squared dot product of the l2-normalised branch vectors,
    averaged over tokens; with three branches the mean of the three pairwise terms.
    0 for orthogonal branches, 1 for parallel ones."""
    if len(quantized) < 2:
        raise ValueError(f"Disentanglement needs at least two branches, got {len(quantized)}.")
    pairs = list(itertools.combinations(quantized, 2))
    return torch.stack([branch_cos2(a, b) for a, b in pairs]).mean()


def _gather_targets(target: Tensor) -> tuple[Tensor, int]:
    """All ranks' targets (B * world, D) and this rank's row offset.

    Only the teacher's (detached) targets are gathered, so no gradient has to flow
    through the gather; every prediction keeps its own gradient. Ranks must hold
    equal batch sizes (DDP with drop_last, as the data modules provide)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return target, 0
    parts = [torch.empty_like(target) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, target.contiguous())
    return torch.cat(parts), dist.get_rank() * target.shape[0]


def semantic_loss(
    prediction: Tensor, target: Tensor, temperature: float = 1.0, gather_negatives: bool = False
) -> tuple[Tensor, Tensor]:
    """In-batch InfoNCE, one direction (prediction -> teacher), teacher detached (SPEC §2).

    Both sides l2-normalised; logits ``pred @ target^T / temperature``; cross-entropy
    against the matching image. With ``gather_negatives`` the other ranks' targets are
    extra negatives (the reference uses only the local batch). Returns (loss, top-1
    accuracy of the matching)."""
    pred = F.normalize(prediction.float(), dim=-1)
    tgt = F.normalize(target.detach().float(), dim=-1)
    offset = 0
    if gather_negatives:
        tgt, offset = _gather_targets(tgt)
    logits = pred @ tgt.t() / temperature
    labels = torch.arange(pred.shape[0], device=pred.device) + offset
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(-1) == labels).float().mean()
    return loss, accuracy


# -- modules -----------------------------------------------------------------------------------


def _grid_pos_embed(pos_embed: Tensor, base_grid: int, grid: tuple[int, int]) -> Tensor:
    """A learned (1, base_grid**2, C) embedding for a (h, w) token grid: itself at the base
    grid, bicubically resampled otherwise (the reference hard-codes 16x16 = 256 px / 16)."""
    if tuple(grid) == (base_grid, base_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, list(grid), old_size=[base_grid, base_grid], num_prefix_tokens=0)


class BranchAdapter(nn.Module):
    """Trunk features (B, C, H, W) -> branch features (B, out_channels, H, W).

    Learned positional embedding over the token grid, LayerNorm, ``depth`` pre-norm
    transformer blocks, LayerNorm, then GroupNorm + SiLU + 3x3 conv (the shape of the
    VQGAN encoder's output head, one per branch)."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        pos_grid: int = 16,
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"Adapter width {channels} is not divisible by adapter.num_heads={num_heads}.")
        self.pos_grid = pos_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid, channels))
        trunc_normal_(self.pos_embed, std=0.02)
        self.norm_in = nn.LayerNorm(channels)
        self.blocks = nn.Sequential(*[Block(channels, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(channels)
        self.out_norm = group_norm(channels)
        self.out_conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        b, c, hh, ww = h.shape
        x = h.flatten(2).transpose(1, 2) + _grid_pos_embed(self.pos_embed, self.pos_grid, (hh, ww))
        x = self.norm_out(self.blocks(self.norm_in(x)))
        x = x.transpose(1, 2).reshape(b, c, hh, ww)
        return self.out_conv(F.silu(self.out_norm(x)))


class RepresentationHead(nn.Module):
    """Quantized branch map (B, code_dim, H, W) -> one vector per image (B, out_dim).

    FQGAN's ``FeatPredHead``: MLP code_dim -> W -> W (ReLU), a learned class token
    prepended, a learned positional embedding over the class token *and* the grid
    (1 + pos_grid**2 positions), LayerNorm, ``depth`` pre-norm transformer blocks of
    ``num_heads`` (8 in the reference at every width), LayerNorm; only the class-token
    output is used. When W differs from the teacher's width (e.g. a random smoke teacher)
    a linear layer maps W -> out_dim; at the reference widths W equals the teacher's
    width and the map is the identity (the released heads load as they are)."""

    def __init__(
        self,
        in_dim: int,
        width: int,
        out_dim: int,
        depth: int = 3,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        pos_grid: int = 16,
    ):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"Head width {width} is not divisible by head.num_heads={num_heads}.")
        self.pos_grid = pos_grid
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, width))
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        self.norm_in = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*[Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim) if width != out_dim else nn.Identity()

    def forward(self, z: Tensor) -> Tensor:
        b, _, h, w = z.shape
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.mlp(z.flatten(2).transpose(1, 2))], dim=1)
        pos = self.pos_embed
        if (h, w) != (self.pos_grid, self.pos_grid):
            pos = resample_abs_pos_embed(pos, [h, w], old_size=[self.pos_grid] * 2, num_prefix_tokens=1)
        x = self.norm_out(self.blocks(self.norm_in(x + pos)))
        return self.proj(x[:, 0])


class FactorBranch(nn.Module):
    """One factor: adapter -> 1x1 conv -> its own quantizer (+ optional representation head)."""

    def __init__(
        self,
        name: str,
        adapter: BranchAdapter,
        quantizer: VectorQuantizer,
        z_channels: int,
        head: RepresentationHead | None = None,
        teacher: TeacherHandle | None = None,
        semantic_weight: float = 0.0,
    ):
        super().__init__()
        self.name = name
        self.adapter = adapter
        self.quant_conv = nn.Conv2d(z_channels, quantizer.code_dim, 1)
        self.quantizer = quantizer
        self.head = head
        self.teacher = teacher  # a TeacherHandle: deliberately not a submodule
        self.semantic_weight = semantic_weight

    def forward(self, trunk: Tensor):
        return self.quantizer(self.quant_conv(self.adapter(trunk)))


# -- the tokenizer ------------------------------------------------------------------------------


def _as_dict(node: Any) -> dict:
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return dict(OmegaConf.to_container(node, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    return dict(node)


def _branch_specs(branches: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[tuple[str, dict]]:
    """Branches as (name, spec) in order, from a name -> spec mapping or a list with names."""
    if isinstance(branches, Mapping) or hasattr(branches, "items"):
        return [(str(k), _as_dict(v)) for k, v in branches.items()]
    specs = []
    for i, b in enumerate(branches):
        b = _as_dict(b)
        specs.append((str(b.pop("name", f"branch{i}")), b))
    return specs


class FQGAN(Tokenizer):
    """Factorized-quantization tokenizer.

    Args:
        encoder, decoder: the conv pieces VQGAN uses. Only ``encoder.trunk`` runs: the
            branches' adapters replace the encoder's output head.
        branches: ordered ``name -> spec`` (or a list of specs with ``name``). A spec may
            set ``codebook_size`` / ``code_dim`` / ``beta`` / ... (overriding ``quantizer``),
            and for a semantic branch ``teacher`` (a teacher spec, see
            ``tokenizers.teachers``), ``semantic_weight`` and ``head_width``.
        quantizer: the per-branch quantizer settings: a callable building a
            ``VectorQuantizer`` from keyword overrides (Hydra ``_partial_: true``) or a
            mapping of ``VectorQuantizer`` keyword arguments.
        adapter: ``depth``, ``num_heads``, ``mlp_ratio``, ``pos_grid`` of each branch adapter
            (its width is the trunk's width).
        head: ``width`` (null: the teacher's width), ``depth``, ``num_heads`` (8 as in
            the reference), ``mlp_ratio``, ``pos_grid`` of the representation heads.
        disentangle_weight: weight of the disentanglement loss (0 turns it off; the
            branches' squared cosine is logged either way).
        semantic_temperature: InfoNCE temperature (1 in the reference).
        gather_negatives: use all ranks' teacher targets as negatives.
        load_teachers: build the teachers now (training: missing weights stop the run at
            construction). False defers loading to the first semantic loss, so a
            checkpoint can be rebuilt to encode/decode on a machine without the
            teachers' weights (head widths come from the teacher architectures).
    """

    discrete = True

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        branches: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        quantizer: Callable[..., VectorQuantizer] | Mapping[str, Any] | None = None,
        adapter: Mapping[str, Any] | None = None,
        head: Mapping[str, Any] | None = None,
        disentangle_weight: float = 0.1,
        semantic_temperature: float = 1.0,
        gather_negatives: bool = False,
        load_teachers: bool = True,
    ):
        super().__init__()
        specs = _branch_specs(branches)
        if len(specs) < 2:
            raise ValueError(f"FQGAN needs at least two branches (dual k=2, triple k=3), got {len(specs)}.")
        self.encoder = encoder
        # The branches' adapters end in their own GroupNorm + SiLU + conv: drop the encoder's
        # output head, whose parameters would otherwise sit unused (DDP rejects unused
        # parameters, and the optimizer would carry dead state).
        self.encoder.norm_out = None
        self.encoder.conv_out = None
        self.decoder = decoder
        z_channels = encoder.out_channels
        trunk_channels = encoder.trunk_channels

        if quantizer is None:
            make_quantizer: Callable[..., VectorQuantizer] = VectorQuantizer
        elif callable(quantizer):
            make_quantizer = quantizer
        else:
            make_quantizer = functools.partial(VectorQuantizer, **_as_dict(quantizer))
        adapter_kw = _as_dict(adapter)
        head_kw = _as_dict(head)
        head_width = head_kw.pop("width", None)

        quantizer_keys = {"codebook_size", "code_dim", "beta", "entropy_weight", "entropy_temperature", "l2_normalize"}
        self.branches = nn.ModuleDict()
        for name, spec in specs:
            q = make_quantizer(**{k: v for k, v in spec.items() if k in quantizer_keys})
            teacher_spec = spec.get("teacher")
            head_module, handle = None, None
            if teacher_spec:
                teacher_spec = _as_dict(teacher_spec)
                teacher_spec.setdefault("weights_key", f"tokenizer.branches.{name}.teacher.weights")
                # built now (by default), so that missing weights stop the run before any training
                handle = TeacherHandle(teacher_spec, lazy=not load_teachers)
                width = int(spec.get("head_width") or head_width or handle.embed_dim)
                head_module = RepresentationHead(q.code_dim, width, handle.embed_dim, **head_kw)
            self.branches[name] = FactorBranch(
                name,
                BranchAdapter(trunk_channels, z_channels, **adapter_kw),
                q,
                z_channels,
                head=head_module,
                teacher=handle,
                semantic_weight=float(spec.get("semantic_weight", 0.5 if handle else 0.0)),
            )
        self.code_dims = tuple(b.quantizer.code_dim for b in self.branches.values())
        self.post_quant_conv = nn.Conv2d(sum(self.code_dims), decoder.z_channels, 1)
        self.codebook_sizes = tuple(b.quantizer.codebook_size for b in self.branches.values())
        self.disentangle_weight = float(disentangle_weight)
        self.semantic_temperature = float(semantic_temperature)
        self.gather_negatives = bool(gather_negatives)

    # -- internals ---------------------------------------------------------------------------
    def _quantize(self, images: Tensor):
        """-> quantized maps (straight-through), index maps, losses, logs (per branch)."""
        trunk = self.encoder.trunk(images)
        quantized, indices, losses, logs = [], [], {}, {}
        for name, branch in self.branches.items():
            z_q, idx, b_losses, b_logs = branch(trunk)
            quantized.append(z_q)
            indices.append(idx)
            losses.update({f"{name}/{k}": v for k, v in b_losses.items()})
            logs.update({f"{name}/{k}": v for k, v in b_logs.items()})
        return quantized, indices, losses, logs

    # -- the contract --------------------------------------------------------------------------
    def forward(self, images: Tensor) -> TokenizerOutput:
        quantized, _, losses, logs = self._quantize(images)

        names = list(self.branches)
        disentangle = disentanglement_loss(quantized)
        logs["branch_cos2"] = disentangle.detach()
        if len(names) > 2:
            for (i, a), (j, b) in itertools.combinations(enumerate(quantized), 2):
                logs[f"branch_cos2/{names[i]}-{names[j]}"] = branch_cos2(a, b).detach()
        if self.disentangle_weight > 0:
            losses["disentanglement"] = self.disentangle_weight * disentangle

        for z_q, (name, branch) in zip(quantized, self.branches.items()):
            if branch.head is None:
                continue
            target = branch.teacher(images).cls
            loss, accuracy = semantic_loss(
                branch.head(z_q), target, self.semantic_temperature, self.gather_negatives
            )
            logs[f"semantic/{name}"] = loss.detach()
            logs[f"semantic_acc/{name}"] = accuracy
            if branch.semantic_weight > 0:
                losses[f"semantic/{name}"] = branch.semantic_weight * loss

        latents = torch.cat(quantized, dim=1)
        return TokenizerOutput(self.decode_latents(latents), losses, logs, latents=latents)

    def encode(self, images: Tensor) -> tuple[Tensor, ...]:
        """Images -> one (B, h, w) index map per branch, in branch order."""
        return tuple(self._quantize(images)[1])

    def decode(self, tokens: Sequence[Tensor], **options) -> Tensor:
        if len(tokens) != len(self.branches):
            raise ValueError(
                f"FQGAN.decode expects one index map per branch ({list(self.branches)}), got {len(tokens)}."
            )
        codes = [b.quantizer.lookup(t) for b, t in zip(self.branches.values(), tokens)]
        return self.decode_latents(torch.cat(codes, dim=1))

    def encode_latents(self, images: Tensor) -> Tensor:
        """The concatenated quantized maps (B, sum(code_dims), h, w)."""
        return torch.cat(self._quantize(images)[0], dim=1)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(latents.to(self.post_quant_conv.weight.dtype)))

    def decoder_last_layer(self) -> Tensor:
        return self.decoder.last_layer

    def encoder_last_layer(self) -> Tensor:
        # the last layer every branch reads: the trunk's final conv (middle block)
        return self.encoder.mid[-1].conv2.weight

    def token_shape(self, image_size: int) -> tuple[int, ...]:
        s = image_size // self.encoder.downsample_factor
        return (s, s)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        return (sum(self.code_dims), *self.token_shape(image_size))

    def set_teachers_device(self, device: torch.device) -> None:
        for branch in self.branches.values():
            if branch.teacher is not None:
                branch.teacher.to(device)

    def teachers(self) -> dict[str, TeacherHandle]:
        return {n: b.teacher for n, b in self.branches.items() if b.teacher is not None}
