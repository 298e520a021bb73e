import math

import pytest
import torch
import torch.nn.functional as F

from tokenizers.quantizers import VectorQuantizer, code_statistics


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    vq = VectorQuantizer(codebook_size=16, code_dim=4, l2_normalize=False)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _, _ = vq(z)
    (z_q * 3.0).sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 3.0))


def test_quantized_values_are_the_nearest_normalised_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=32, code_dim=4)
    z = torch.randn(2, 4, 5, 5)
    z_q, idx, _, _ = vq(z)
    zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    codes = F.normalize(vq.embedding.weight, dim=-1)
    brute = torch.cdist(zf, codes).argmin(-1)
    assert torch.equal(idx.reshape(-1), brute)
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 4), codes[brute], atol=1e-6)


def test_codebook_and_commitment_losses_on_hand_built_input():
    vq = VectorQuantizer(codebook_size=2, code_dim=2, beta=0.25, l2_normalize=False)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    z = torch.tensor([[0.5, 0.0], [0.0, 2.0]]).t().reshape(1, 2, 1, 2)  # tokens (0.5,0) and (0,2)
    _, idx, losses, _ = vq(z)
    assert idx.reshape(-1).tolist() == [0, 1]
    # squared errors: (0.5)^2 and (1)^2 over 4 elements -> mean 1.25 / 4
    expected = (0.25 + 1.0) / 4
    assert losses["codebook"].item() == pytest.approx(expected)
    assert losses["commitment"].item() == pytest.approx(0.25 * expected)


def test_beta_weights_commitment_not_codebook():
    vq = VectorQuantizer(codebook_size=8, code_dim=4, beta=0.25)
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    _, _, losses, _ = vq(z)
    losses["codebook"].backward()
    assert z.grad is None or torch.count_nonzero(z.grad) == 0  # codebook term moves codes only
    assert vq.embedding.weight.grad is not None


def test_entropy_term_is_absent_at_weight_zero_and_present_otherwise():
    z = torch.randn(2, 4, 3, 3)
    assert "entropy" not in VectorQuantizer(16, 4, entropy_weight=0.0)(z)[2]
    assert "entropy" in VectorQuantizer(16, 4, entropy_weight=0.03)(z)[2]


def test_entropy_term_equals_direct_computation():
    torch.manual_seed(1)
    vq = VectorQuantizer(16, 4, entropy_weight=1.0, entropy_temperature=0.5)
    z = torch.randn(2, 4, 3, 3)
    loss = vq(z)[2]["entropy"]
    zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    d = torch.cdist(zf, vq.codes()) ** 2
    p = torch.softmax(-d / 0.5, -1)
    per_token = -(p * p.log()).sum(-1).mean()
    pm = p.mean(0)
    assert loss.item() == pytest.approx((per_token + (pm * pm.log()).sum()).item(), abs=1e-4)


def test_chunked_search_equals_unchunked():
    torch.manual_seed(0)
    vq = VectorQuantizer(codebook_size=512, code_dim=8)
    z = F.normalize(torch.randn(1000, 8), dim=-1)
    full = vq.nearest(z, chunk_size=1000)
    for chunk in (1, 7, 64, 333):
        assert torch.equal(vq.nearest(z, chunk_size=chunk), full)


def test_search_memory_is_bounded_by_chunking():
    vq = VectorQuantizer(codebook_size=1024, code_dim=8, max_distance_elements=4096)
    assert max(1, vq.max_distance_elements // 1024) == 4  # 4 tokens per chunk
    z = F.normalize(torch.randn(50, 8), dim=-1)
    assert torch.equal(vq.nearest(z), vq.nearest(z, chunk_size=50))


def test_usage_and_perplexity_on_hand_built_indices():
    usage, ppl = code_statistics(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), codebook_size=8)
    assert usage.item() == pytest.approx(0.5)
    assert ppl.item() == pytest.approx(4.0)  # uniform over 4 codes


def test_usage_tracker_is_a_plain_buffer_without_autograd_history():
    vq = VectorQuantizer(16, 4)
    vq(torch.randn(2, 4, 4, 4, requires_grad=True))
    assert not vq.recent_indices.requires_grad
    assert (vq.recent_indices >= 0).sum() == 32
