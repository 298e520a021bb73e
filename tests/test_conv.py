import pytest
import torch

from tokenizers.conv import Decoder, Encoder
from tokenizers.quantizers import VectorQuantizer
from tokenizers.vqgan import VQGAN


@pytest.mark.parametrize("size", [64, 128, 256])
def test_encoder_decoder_shapes_follow_the_resolution(size):
    enc = Encoder(width=8, mults=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=16)
    dec = Decoder(width=8, mults=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=16)
    x = torch.randn(1, 3, size, size)
    z = enc(x)
    assert z.shape == (1, 16, size // 16, size // 16)
    assert dec(z).shape == x.shape


def test_trunk_exposes_the_middle_block_features():
    enc = Encoder(width=8, mults=(1, 2, 4), num_res_blocks=1, z_channels=16)
    h = enc.trunk(torch.randn(1, 3, 32, 32))
    assert h.shape == (1, enc.trunk_channels, 8, 8) and enc.trunk_channels == 32


def test_double_z_doubles_the_output_channels():
    assert Encoder(width=8, mults=(1, 2), z_channels=4, double_z=True)(torch.randn(1, 3, 16, 16)).shape[1] == 8


def _tiny_vqgan():
    return VQGAN(Encoder(width=8, mults=(1, 2, 2), num_res_blocks=1, z_channels=16),
                 Decoder(width=8, mults=(1, 2, 2), num_res_blocks=1, z_channels=16),
                 VectorQuantizer(codebook_size=64, code_dim=4))


def test_vqgan_decode_of_encode_equals_forward_reconstruction_in_eval():
    torch.manual_seed(0)
    model = _tiny_vqgan().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(x)
        tokens = model.encode(x)
        assert tokens.shape == (2, 8, 8) and tokens.dtype == torch.long
        assert torch.allclose(model.decode(tokens), out.reconstruction, atol=1e-5)


def test_vqgan_facts_for_the_report():
    model = _tiny_vqgan()
    assert model.token_shape(64) == (16, 16)
    assert model.tokens_per_image(64) == 256
    assert model.bits_per_image(64) == pytest.approx(256 * 6)
