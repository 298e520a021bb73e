"""Banded DCT energy of latents and images."""
from __future__ import annotations

import math

import pytest
import torch

from tokenizers.spectrum import dct2, dct_band_energy, dct_matrix


def test_dct_matrix_is_orthonormal():
    for n in (1, 2, 7, 16):
        d = dct_matrix(n, dtype=torch.float64)
        assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_dct2_preserves_energy():
    x = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    assert dct2(x).pow(2).sum().item() == pytest.approx(x.pow(2).sum().item(), rel=1e-10)


@pytest.mark.parametrize("size", [(32, 32), (16, 8), (2, 2)])
def test_constant_image_puts_all_energy_in_the_lowest_band(size):
    x = torch.full((2, 3, *size), 0.7)
    bands, high = dct_band_energy(x, num_bands=8)
    assert bands.shape == (8,)
    assert bands[0].item() == pytest.approx(1.0, abs=1e-6)
    assert bands[1:].abs().max().item() < 1e-6
    assert high == pytest.approx(0.0, abs=1e-6)


def test_checkerboard_puts_all_energy_in_the_highest_band():
    # the (H-1, W-1) DCT basis is the finest pattern: r = sqrt(2) (15/16) / sqrt(2) = 0.94
    n = 16
    d = dct_matrix(n, dtype=torch.float64)
    basis = torch.outer(d[n - 1], d[n - 1]).float()[None, None]
    bands, high = dct_band_energy(basis, num_bands=8)
    assert bands[7].item() == pytest.approx(1.0, abs=1e-5)
    assert high == pytest.approx(1.0, abs=1e-5)


def test_band_of_a_single_basis_function_follows_its_radial_frequency():
    n, (k, l) = 16, (4, 0)  # r = (4 / 16) / sqrt(2) = 0.177 -> band floor(0.177 * 8) = 1
    d = dct_matrix(n, dtype=torch.float64)
    basis = torch.outer(d[k], d[l]).float()[None, None]
    bands, high = dct_band_energy(basis, num_bands=8)
    assert int(bands.argmax()) == math.floor((k / n) / math.sqrt(2) * 8) == 1
    assert bands[1].item() == pytest.approx(1.0, abs=1e-5)
    assert high == pytest.approx(0.0, abs=1e-6)


def test_bands_sum_to_one_and_high_share_is_the_upper_half():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 12, 12)
    bands, high = dct_band_energy(x, num_bands=8)
    assert bands.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert high == pytest.approx(bands[4:].sum().item(), abs=1e-5)


def test_each_channel_counts_equally_whatever_its_scale():
    const = torch.full((1, 1, 8, 8), 100.0)  # all low frequency, large
    d = dct_matrix(8, dtype=torch.float64)
    fine = torch.outer(d[7], d[7]).float()[None, None] * 0.01  # all high frequency, tiny
    bands, high = dct_band_energy(torch.cat([const, fine], 1), num_bands=4)
    assert high == pytest.approx(0.5, abs=1e-5)
    assert bands[0].item() == pytest.approx(0.5, abs=1e-5)


def test_all_zero_maps_are_left_out_of_the_average():
    x = torch.cat([torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 2.0)], 1)
    bands, high = dct_band_energy(x, num_bands=4)
    assert bands[0].item() == pytest.approx(1.0, abs=1e-6)


def test_white_noise_spreads_energy_like_the_coefficient_count():
    torch.manual_seed(1)
    x = torch.randn(64, 4, 16, 16)
    _, high = dct_band_energy(x, num_bands=8)
    r = torch.sqrt((torch.arange(16.0)[:, None] / 16) ** 2 + (torch.arange(16.0)[None] / 16) ** 2) / math.sqrt(2)
    expected = (r >= 0.5).float().mean().item()  # white noise: equal expected energy per coefficient
    assert high == pytest.approx(expected, abs=0.01)


def test_rejects_non_4d_input():
    with pytest.raises(ValueError, match="B, C, H, W"):
        dct_band_energy(torch.randn(3, 8, 8))


def test_excluding_dc_ignores_the_mean_of_each_map():
    d = dct_matrix(8, dtype=torch.float64)
    fine = torch.outer(d[7], d[7]).float()[None, None]
    bands, high = dct_band_energy(fine + 5.0, num_bands=4, exclude_dc=True)
    assert high == pytest.approx(1.0, abs=1e-5)
    _, high_with_dc = dct_band_energy(fine + 5.0, num_bands=4)
    assert high_with_dc < 0.01
