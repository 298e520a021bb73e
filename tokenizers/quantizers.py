"""Vector quantizer with l2-normalised codes (LlamaGen / FQGAN recipe, SPEC.md §1).

Not vector-quantize-pytorch's ``VectorQuantize``: its defaults (EMA codebook updates,
rotation trick) are not the VQGAN recipe, and its one-hot selection exhausts memory at
ImageNet batch sizes (PITFALLS.md, Models).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def code_statistics(indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(usage, perplexity) of a set of code indices.

    usage: fraction of the codebook that occurs at least once; perplexity:
    ``exp(entropy of the code frequencies)``."""
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
    return (counts > 0).double().mean(), entropy.exp()


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer on the unit sphere with a straight-through gradient.

    Losses (returned weighted): codebook ``mean||q - sg(z)||^2`` (weight 1), commitment
    ``beta * mean||sg(q) - z||^2`` and, when ``entropy_weight > 0``, the entropy term
    ``entropy_weight * (mean per-token entropy - entropy of the mean distribution)`` with
    ``p = softmax(-d / entropy_temperature)``. beta weights the commitment term (taming's
    legacy quantizer puts it on the codebook term, which is wrong).
    """

    def __init__(
        self,
        codebook_size: int = 16384,
        code_dim: int = 8,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        l2_normalize: bool = True,
        max_distance_elements: int = 2**24,
        usage_window: int = 65536,
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.l2_normalize = l2_normalize
        # tokens per chunk of the nearest-code search: chunk * K distances at most
        self.max_distance_elements = max_distance_elements
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_normalize:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # plain buffers updated under no_grad (a Parameter-backed tracker leaks autograd history)
        self.register_buffer("recent_indices", torch.full((usage_window,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("recent_pos", torch.zeros((), dtype=torch.long), persistent=False)

    # -- codes ------------------------------------------------------------------------
    def codes(self) -> Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def _prepare(self, z_flat: Tensor) -> Tensor:
        return F.normalize(z_flat, dim=-1) if self.l2_normalize else z_flat

    @torch.no_grad()
    def nearest(self, z_flat: Tensor, codes: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        """Index of the nearest code for each row of ``z_flat`` (N, D), searched in chunks
        so that at most ``max_distance_elements`` distances exist at once.

        ``argmin_k ||z - c_k||^2 = argmin_k (||c_k||^2 - 2 z.c_k)``: the ``||z||^2`` term is
        the same for every code of a row and is left out; the rest is a single matmul of
        ``[z, 1]`` with ``[-2 c_k, ||c_k||^2]``, so each chunk's scores are written once
        and read once by the argmin (the plain formula makes five passes over them)."""
        codes = (self.codes() if codes is None else codes).float()
        if chunk_size is None:
            chunk_size = max(1, self.max_distance_elements // codes.shape[0])
        codes_aug_t = torch.cat([-2.0 * codes, (codes**2).sum(-1, keepdim=True)], dim=1).t()
        out = torch.empty(z_flat.shape[0], dtype=torch.long, device=z_flat.device)
        for start in range(0, z_flat.shape[0], chunk_size):
            zc = z_flat[start : start + chunk_size].float()
            zc_aug = torch.cat([zc, torch.ones_like(zc[:, :1])], dim=1)
            torch.argmin(zc_aug @ codes_aug_t, dim=-1, out=out[start : start + chunk_size])
        return out

    def lookup(self, indices: Tensor) -> Tensor:
        """(B, H, W) indices -> (B, D, H, W) codes."""
        return self.codes()[indices].permute(0, 3, 1, 2).contiguous()

    # -- training ---------------------------------------------------------------------
    def entropy_loss(self, z_flat: Tensor, codes: Tensor) -> Tensor:
        """``mean per-token entropy - entropy of the mean distribution`` of
        ``p = softmax(-d / T)`` over squared distances d, accumulated over chunks of tokens:
        each chunk's (N_c, K) probabilities are recomputed in the backward pass instead
        of kept (activation checkpointing), so memory stays at one chunk whatever N."""
        n = z_flat.shape[0]
        chunk = max(1, self.max_distance_elements // codes.shape[0])
        codes_sq = (codes**2).sum(-1)
        keep_graph = torch.is_grad_enabled() and (z_flat.requires_grad or codes.requires_grad)
        entropy_sum, probs_sum = None, None
        for start in range(0, n, chunk):
            zc = z_flat[start : start + chunk]
            if keep_graph:
                e, p = checkpoint(self._entropy_terms, zc, codes, codes_sq, use_reentrant=False)
            else:
                e, p = self._entropy_terms(zc, codes, codes_sq)
            entropy_sum = e if entropy_sum is None else entropy_sum + e
            probs_sum = p if probs_sum is None else probs_sum + p
        per_token = entropy_sum / n
        mean_probs = probs_sum / n
        batch = -(mean_probs * mean_probs.clamp_min(1e-5).log()).sum()
        return per_token - batch

    def _entropy_terms(self, zc: Tensor, codes: Tensor, codes_sq: Tensor) -> tuple[Tensor, Tensor]:
        """(sum over the chunk's tokens of their entropy, sum of their probabilities (K,))."""
        d = (zc**2).sum(-1, keepdim=True) + codes_sq[None] - 2 * zc @ codes.t()
        probs = F.softmax(-d / self.entropy_temperature, dim=-1)
        log_probs = F.log_softmax(-d / self.entropy_temperature, dim=-1)
        return -(probs * log_probs).sum(), probs.sum(0)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """z (B, D, H, W) -> (z_q straight-through, indices (B, H, W), losses, logs)."""
        with torch.autocast(device_type=z.device.type, enabled=False):  # fp32 search and losses under bf16-mixed
            return self._quantize(z)

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        b, d, h, w = z.shape
        z = z.float()
        z_flat = self._prepare(z.permute(0, 2, 3, 1).reshape(-1, d))
        codes = self.codes().float()
        indices = self.nearest(z_flat, codes)
        q_flat = codes[indices]  # select by indexing, not a one-hot matmul
        losses = {
            "codebook": F.mse_loss(q_flat, z_flat.detach()),
            "commitment": self.beta * F.mse_loss(z_flat, q_flat.detach()),
        }
        if self.entropy_weight > 0:  # only computed when used: it needs the full softmax
            losses["entropy"] = self.entropy_weight * self.entropy_loss(z_flat, codes)
        q_st = z_flat + (q_flat - z_flat).detach()
        z_q = q_st.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        indices = indices.reshape(b, h, w)
        logs = self.track(indices)
        return z_q, indices, losses, logs

    @torch.no_grad()
    def track(self, indices: Tensor) -> dict[str, Tensor]:
        """Batch usage/perplexity plus usage over a window of recent indices (an estimate;
        the evaluator reports usage over the whole split)."""
        flat = indices.reshape(-1)
        usage, perplexity = code_statistics(flat, self.codebook_size)
        if self.training:
            n = min(flat.numel(), self.recent_indices.numel())
            pos = int(self.recent_pos)
            idx = (torch.arange(n, device=flat.device) + pos) % self.recent_indices.numel()
            self.recent_indices[idx] = flat[:n]
            self.recent_pos.fill_((pos + n) % self.recent_indices.numel())
        seen = self.recent_indices[self.recent_indices >= 0]
        window_usage = (
            torch.unique(seen).numel() / self.codebook_size if seen.numel() else torch.tensor(0.0)
        )
        return {
            "usage_batch": usage.float(),
            "perplexity": perplexity.float(),
            "usage_window": torch.as_tensor(window_usage, dtype=torch.float32),
        }
