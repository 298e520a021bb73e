"""The quantizer's hot paths (nearest-code search, chunked entropy term, fp32 under
bf16 autocast) give the same outputs as the plain formulas, with bounded memory."""
import pytest
import torch
import torch.nn.functional as F

from tokenizers.quantizers import VectorQuantizer


def plain_distances(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (z**2).sum(-1, keepdim=True) + (codes**2).sum(-1)[None] - 2 * z @ codes.t()


def plain_entropy(z: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """SPEC §1's entropy term on the full (N, K) matrix, as the reference computes it."""
    logits = -plain_distances(z, codes) / temperature
    probs, log_probs = F.softmax(logits, -1), F.log_softmax(logits, -1)
    mean_probs = probs.mean(0)
    return -(probs * log_probs).sum(-1).mean() + (mean_probs * mean_probs.clamp_min(1e-5).log()).sum()


@pytest.mark.parametrize("l2", [True, False])
def test_nearest_matches_argmin_of_full_distances(l2):
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=512, code_dim=8, l2_normalize=l2)
    if not l2:
        torch.nn.init.normal_(vq.embedding.weight)
    z = vq._prepare(torch.randn(3000, 8))
    expected = plain_distances(z, vq.codes()).argmin(-1)
    assert torch.equal(vq.nearest(z), expected)


def test_chunked_entropy_equals_full_matrix_value_and_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=256, code_dim=8, entropy_weight=0.03, max_distance_elements=256 * 7)
    z = F.normalize(torch.randn(100, 8), dim=-1).requires_grad_(True)  # 15 chunks of 7 tokens (last one short)
    codes = vq.codes()
    chunked = vq.entropy_loss(z, codes)
    full = plain_entropy(z, codes, vq.entropy_temperature)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    (g_chunked,) = torch.autograd.grad(chunked, z)
    (g_full,) = torch.autograd.grad(full, z)
    torch.testing.assert_close(g_chunked, g_full, rtol=1e-4, atol=1e-6)


def test_entropy_backward_keeps_no_full_distance_matrix():
    torch.manual_seed(0)
    n, k = 512, 1024
    vq = VectorQuantizer(codebook_size=k, code_dim=8, entropy_weight=0.03, max_distance_elements=k * 128)
    z = torch.randn(2, 8, 16, 16, requires_grad=True)  # 512 tokens
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, _, losses, _ = vq(z)
    assert "entropy" in losses
    # what autograd keeps for the backward pass: a small fraction of one (N, K) matrix in total
    # (without recomputation every chunk's distances and probabilities stay alive: ~4 N K)
    assert sum(saved) < n * k // 4
    losses["entropy"].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_quantizer_searches_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=4096, code_dim=8, entropy_weight=0.03)
    z = torch.randn(4, 8, 8, 8)
    _, expected, fp32_losses, _ = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, indices, losses, _ = vq(z)
    assert torch.equal(indices, expected)  # bf16 distances would pick other codes for near ties
    assert z_q.dtype == torch.float32 and all(v.dtype == torch.float32 for v in losses.values())
    assert losses["entropy"].item() == pytest.approx(fp32_losses["entropy"].item(), rel=1e-6)
