"""VQGAN (LlamaGen-style baseline, SPEC.md §1): conv encoder -> 1x1 -> l2 VQ -> 1x1 -> conv decoder."""
from __future__ import annotations

from torch import Tensor, nn

from tokenizers.contract import Tokenizer, TokenizerOutput
from tokenizers.conv import Decoder, Encoder
from tokenizers.quantizers import VectorQuantizer


class VQGAN(Tokenizer):
    discrete = True

    def __init__(self, encoder: Encoder, decoder: Decoder, quantizer: VectorQuantizer):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        self.quant_conv = nn.Conv2d(encoder.out_channels, quantizer.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(quantizer.code_dim, decoder.z_channels, 1)
        self.codebook_sizes = (quantizer.codebook_size,)

    def _quantize(self, images: Tensor):
        return self.quantizer(self.quant_conv(self.encoder(images)))

    def forward(self, images: Tensor) -> TokenizerOutput:
        z_q, indices, losses, logs = self._quantize(images)
        return TokenizerOutput(self.decode_latents(z_q), losses, logs, latents=z_q)

    def encode(self, images: Tensor) -> Tensor:
        return self._quantize(images)[1]

    def decode(self, tokens: Tensor, **options) -> Tensor:
        return self.decode_latents(self.quantizer.lookup(tokens))

    def encode_latents(self, images: Tensor) -> Tensor:
        return self._quantize(images)[0]

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(latents.to(self.post_quant_conv.weight.dtype)))

    def decoder_last_layer(self) -> Tensor:
        return self.decoder.last_layer

    def encoder_last_layer(self) -> Tensor:
        return self.quant_conv.weight

    def token_shape(self, image_size: int) -> tuple[int, ...]:
        s = image_size // self.encoder.downsample_factor
        return (s, s)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        return (self.quantizer.code_dim, *self.token_shape(image_size))
