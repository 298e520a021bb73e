"""Claims about the evaluator's metrics (common/metrics.py)."""
import math

import pytest
import torch

from common.metrics import (
    INCEPTION_FILE,
    CodeUsage,
    MeanMeter,
    MissingWeightsError,
    as_index_maps,
    build_fid,
    build_lpips,
    psnr_per_image,
    ssim_per_image,
    to_pixels,
)


def checkerboard(shape):
    b, c, h, w = shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((yy + xx) % 2) * 2 - 1).double().expand(b, c, h, w)


def test_psnr_of_known_noise_equals_the_analytic_value():
    target = torch.full((2, 3, 16, 16), 100.0, dtype=torch.float64)
    amplitude = torch.tensor([2.0, 10.0], dtype=torch.float64).view(2, 1, 1, 1)
    noisy = target + amplitude * checkerboard(target.shape)  # MSE = amplitude^2 exactly
    expected = 10 * torch.log10(255.0**2 / amplitude.flatten() ** 2)
    assert torch.allclose(psnr_per_image(noisy, target), expected, atol=1e-10)


def test_split_psnr_is_the_mean_of_per_image_values_not_pooled_mse():
    target = torch.full((2, 3, 8, 8), 50.0, dtype=torch.float64)
    amplitude = torch.tensor([1.0, 16.0], dtype=torch.float64).view(2, 1, 1, 1)
    meter = MeanMeter()
    meter.update(psnr_per_image(target + amplitude * checkerboard(target.shape), target))
    per_image_mean = (10 * math.log10(255.0**2 / 1.0) + 10 * math.log10(255.0**2 / 256.0)) / 2
    pooled = 10 * math.log10(255.0**2 / ((1.0 + 256.0) / 2))
    assert meter.compute() == pytest.approx(per_image_mean, abs=1e-9)
    assert abs(meter.compute() - pooled) > 1.0


def test_pixels_are_rounded_integers_on_0_255():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5]).view(1, 1, 2, 2)
    assert to_pixels(x).flatten().tolist() == [0.0, 128.0, 255.0, 191.0]


def test_identical_images_give_the_best_ssim():
    x = to_pixels(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert torch.allclose(ssim_per_image(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_identical_images_give_lpips_zero_and_different_ones_do_not():
    lpips = build_lpips(allow_random=True)  # random backbone when the VGG weights are absent
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    same = lpips(x, x)
    assert same.shape == (2,)
    assert torch.allclose(same, torch.zeros(2), atol=1e-7)
    assert (lpips(x, -x) > 1e-4).all()


def test_code_usage_counts_a_hand_built_index_set_exactly():
    usage = CodeUsage([5, 3])
    usage.update([torch.tensor([[0, 0, 1]]), torch.tensor([[2, 2, 2]])])
    usage.update([torch.tensor([[3, 3, 3]]), torch.tensor([[0, 2, 2]])])
    first, second = usage.synced_counts()
    assert first.tolist() == [2, 1, 0, 3, 0]
    assert second.tolist() == [1, 0, 5]
    assert CodeUsage.usage(first) == pytest.approx(3 / 5)
    p = torch.tensor([2, 1, 3], dtype=torch.float64) / 6
    assert CodeUsage.perplexity(first) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-12)
    assert CodeUsage.perplexity(torch.tensor([4, 4, 4, 4])) == pytest.approx(4.0)


def test_code_usage_rejects_out_of_range_indices():
    with pytest.raises(ValueError, match="out of range"):
        CodeUsage([4]).update([torch.tensor([4])])


def test_index_maps_must_match_the_declared_codebooks():
    assert len(as_index_maps(torch.zeros(2, 4, 4, dtype=torch.long), 1)) == 1
    assert len(as_index_maps([torch.zeros(2, 4, dtype=torch.long)] * 3, 3)) == 3
    with pytest.raises(ValueError, match="codebook_sizes"):
        as_index_maps([torch.zeros(2, 4, dtype=torch.long)] * 2, 3)


def test_fid_of_a_set_with_itself_is_zero_and_of_shifted_sets_is_not():
    fid = build_fid(random_features=True)
    images = (torch.rand(24, 3, 32, 32) * 255).to(torch.uint8)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert float(fid.compute()) == pytest.approx(0.0, abs=1e-3)
    other = build_fid(random_features=True)
    other.update(images, real=True)
    other.update((images // 2), real=False)
    assert float(other.compute()) > 1e-2


def test_missing_inception_weights_stop_with_the_file_name_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        build_fid(weights=None, random_features=False)
    message = str(info.value)
    assert INCEPTION_FILE in message and str(tmp_path / "checkpoints") in message and "debug=smoke" in message


def test_missing_lpips_weights_outside_smoke_stop_with_the_file_name(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        build_lpips(weights=None, allow_random=False)
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "metrics.lpips.weights=" in message and "debug=smoke" in message


@pytest.mark.slow  # Inception at 299 px: about a minute on the shared 2-core machine
def test_a_local_inception_file_is_loaded_and_used_with_the_tf1_resize(tmp_path):
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # an Inception-shaped weights file (random values: no download here)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None), \
         mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}):
        state = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    torch.save(state, tmp_path / INCEPTION_FILE)
    fid = build_fid(weights=str(tmp_path / INCEPTION_FILE), float64_features=False)  # float64 Inception is slow on CPU
    assert fid.inception.use_antialias is False  # TF1-compatible bilinear resize, as in published FIDs
    assert fid.real_features_sum.dtype == torch.float64
    assert torch.equal(fid.inception.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    images = (torch.rand(3, 3, 32, 32) * 255).to(torch.uint8)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert float(fid.compute()) == pytest.approx(0.0, abs=1e-2)
