"""Quantizers alone: forward + backward of (straight-through output + losses) for N tokens.

Vector quantization with a 16384 x 8 l2-normalised codebook:
- ``tokbench``: ``tokenizers.quantizers.VectorQuantizer`` (chunked one-matmul search,
  entropy term only when weighted, chunked and recomputed);
- ``tokbench-previous``: the search as this project did it before the hot-path work
  (five passes over each chunk's distances), for the before/after figure;
- ``llamagen``: LlamaGen's ``VectorQuantizer`` (from ``--ref``; it always builds the full
  distance matrix and its entropy loss);
- ``vqtorch``: vector-quantize-pytorch's ``VectorQuantize`` (cosine similarity, its
  defaults otherwise: EMA codebook).

FSQ [8, 8, 8, 5, 5, 5]: ``tokbench`` (``tokenizers.fsq.FSQ``) and ``vqtorch``
(vector-quantize-pytorch's ``FSQ``, FlexTok's reference).
"""
from __future__ import annotations

import sys

import torch


def previous_nearest(vq, z_flat, codes):
    """The nearest-code search before the hot-path change, kept for the before figure."""
    chunk = max(1, vq.max_distance_elements // codes.shape[0])
    codes_sq = (codes**2).sum(-1)
    out = torch.empty(z_flat.shape[0], dtype=torch.long)
    for start in range(0, z_flat.shape[0], chunk):
        zc = z_flat[start : start + chunk]
        d = (zc**2).sum(-1, keepdim=True) + codes_sq[None] - 2 * zc @ codes.t()
        out[start : start + chunk] = d.argmin(-1)
    return out


def build_vq(spec: dict):
    impl, k, d = spec["impl"], spec.get("codebook_size", 16384), spec.get("code_dim", 8)
    entropy = spec.get("entropy_weight", 0.0)
    if impl in ("tokbench", "tokbench-previous"):
        from tokenizers.quantizers import VectorQuantizer

        vq = VectorQuantizer(codebook_size=k, code_dim=d, entropy_weight=entropy)
        if impl == "tokbench-previous":
            vq.nearest = lambda z_flat, codes=None: previous_nearest(vq, z_flat, codes if codes is not None else vq.codes())

        def call(z):
            z_q, _, losses, _ = vq(z)
            return z_q, sum(losses.values())

        return vq, call
    if impl == "llamagen":
        sys.path.insert(0, f"{spec['ref']}/LlamaGen")
        from tokenizer.tokenizer_image.vq_model import VectorQuantizer

        vq = VectorQuantizer(k, d, 0.25, entropy, True, False)

        def call(z):
            z_q, (a, b, c, _), _ = vq(z)
            return z_q, a + b + c

        return vq, call
    if impl == "vqtorch":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=d, codebook_size=k, use_cosine_sim=True, commitment_weight=0.25,
                            channel_last=False, accept_image_fmap=True)

        def call(z):
            z_q, _, loss = vq(z)
            return z_q, loss.sum()

        return vq, call
    raise ValueError(f"unknown quantizer impl {impl!r}")


def run_vq(spec: dict) -> dict:
    from benchmarks.measure import time_calls

    torch.manual_seed(0)
    vq, call = build_vq(spec)
    vq.train()
    tokens, d = spec["tokens"], spec.get("code_dim", 8)
    side = 16
    z = torch.randn(tokens // (side * side), d, side, side, requires_grad=True)

    def step():
        z_q, loss = call(z)
        (z_q.square().mean() + loss).backward()
        z.grad = None

    return time_calls(step, warmup=spec.get("warmup", 1), iters=spec.get("iters", 2))


def run_fsq(spec: dict) -> dict:
    from benchmarks.measure import time_calls

    torch.manual_seed(0)
    levels = [8, 8, 8, 5, 5, 5]
    if spec["impl"] == "tokbench":
        from tokenizers.fsq import FSQ

        fsq = FSQ(levels)
    else:
        from vector_quantize_pytorch import FSQ

        fsq = FSQ(levels)
    z = torch.randn(spec["tokens"] // 256, 256, len(levels), requires_grad=True)

    def step():
        codes, _ = fsq(z)
        codes.square().mean().backward()
        z.grad = None

    return time_calls(step, warmup=spec.get("warmup", 1), iters=spec.get("iters", 3))
