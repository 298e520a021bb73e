"""LightningDiT-style class-conditional latent generator (SPEC.md §6), model only.

Time convention (``diffusion.flow``): t = 0 is DATA, t = 1 is NOISE,
``x_t = t * eps + (1 - t) * x0`` and the model predicts the velocity ``eps - x0``.

API::

    model = LatentDiT(in_channels=32, input_size=16, patch_size=1, hidden=768, depth=12,
                      heads=12, num_classes=1000, class_dropout=0.1, qk_norm=True, use_rope=True)
    v = model(x_t, t, y)          # x_t (B, C, H, W), t (B,) in [0, 1], y (B,) int64 -> (B, C, H, W)
    loss = flow.flow_loss(v, flow.velocity_target(x0, eps))
    x0 = model.sample(y, steps=50, guidance=4.0, guidance_interval=(0.0, 0.7), shift=1.0,
                      guided_channels=None)

- ``y == model.null_class`` (= ``num_classes``) is the unconditional label. In training
  mode (or with ``drop_labels=True``) each label is replaced by it with probability
  ``class_dropout``, which is what classifier-free guidance needs.
- Latents must be normalised per channel (dataset mean / std) by the caller before
  training and de-normalised after ``sample``; the model knows nothing about that.
- Blocks: adaLN-Zero, RMSNorm, SwiGLU (hidden 2/3 * 4 * d), optional QK-norm, fixed 2D
  sin-cos embedding added at the input plus optional 2D RoPE in every attention layer.
  Reference sizes (hidden/depth/heads): B 768/12/12, L 1024/24/16, XL 1152/28/16.
- ``sample`` batches the conditional and unconditional branches into one forward pass
  and guides the first ``guided_channels`` channels (None: all), only while t lies inside
  ``guidance_interval``.

LightningDiT's reference sampler in this convention. Its code (SiT's transport) has t = 0
NOISE, t = 1 DATA, ``x_t = t * x_data + (1 - t) * eps`` and predicts ``x_data - eps``. With
tau = 1 - t (ours), the velocity only changes sign, and its settings become:

=============================  ====================================  =============================
LightningDiT (its t)           here (t = 1 - its t)                  why
=============================  ====================================  =============================
``num_sampling_steps: 250``    ``steps: 249``                        torchdiffeq's Euler over 250
                                                                     time points takes 249 steps
``timestep_shift: 0.3``        ``shift: 3.333`` (1 / 0.3)            ``1 - f_s(1 - tau) = f_{1/s}(tau)``
                                                                     for ``f_s(u) = s u / (1 + (s - 1) u)``
``cfg_interval_start: 0.125``  ``guidance_interval: [0, 0.875]``     guided where its t >= 0.125
``cfg_scale: 6.7`` on 3 ch.    ``cfg_scale: 6.7, guided_channels: 3``  (DiT's learn-sigma leftover)
=============================  ====================================  =============================
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion import flow
from diffusion.blocks import Block, FinalLayer, Rope2D, TimestepEmbedder, patchify, sincos_2d, unpatchify


class LatentDiT(nn.Module):
    def __init__(self, in_channels: int, input_size: int, patch_size: int = 1, hidden: int = 768,
                 depth: int = 12, heads: int = 12, num_classes: int = 1000, class_dropout: float = 0.1,
                 qk_norm: bool = True, use_rope: bool = True, mlp_ratio: float = 4.0, norm: str = "rmsnorm"):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}.")
        self.in_channels, self.input_size, self.patch_size = in_channels, input_size, patch_size
        self.num_classes, self.class_dropout = num_classes, class_dropout
        self.null_class = num_classes
        self.grid = input_size // patch_size

        self.patch_embed = nn.Linear(in_channels * patch_size**2, hidden)
        self.register_buffer("pos_embed", sincos_2d(hidden, self.grid, self.grid).clone(), persistent=False)
        self.t_embed = TimestepEmbedder(hidden)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # last row: the null (unconditional) label
        self.rope = Rope2D(hidden // heads) if use_rope else None
        self.blocks = nn.ModuleList(
            Block(hidden, heads, mlp_ratio, norm=norm, qk_norm=qk_norm, bias=True, cond_dim=hidden)
            for _ in range(depth)
        )
        self.final = FinalLayer(hidden, in_channels * patch_size**2, cond_dim=hidden, norm=norm)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every modulation and the output projection start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.modulation.linear.weight)
            nn.init.zeros_(block.modulation.linear.bias)
        for layer in (self.final.modulation.linear, self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def drop_labels(self, y: Tensor) -> Tensor:
        drop = torch.rand(y.shape, device=y.device) < self.class_dropout
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor, drop_labels: bool | None = None) -> Tensor:
        """Velocity ``eps - x0`` predicted at (x_t, t) for labels y (``null_class`` = none)."""
        b, c, h, w = x_t.shape
        if c != self.in_channels or h != self.input_size or w != self.input_size:
            raise ValueError(f"LatentDiT expects latents (B, {self.in_channels}, {self.input_size}, "
                             f"{self.input_size}), got {tuple(x_t.shape)}.")
        if (self.training if drop_labels is None else drop_labels) and self.class_dropout > 0:
            y = self.drop_labels(y)
        x = self.patch_embed(patchify(x_t, self.patch_size)) + self.pos_embed.to(x_t.dtype)
        cond = self.t_embed(t) + self.y_embed(y)
        rope = self.rope(self.grid, self.grid, x.device) if self.rope is not None else None
        for block in self.blocks:
            x = block(x, cond=cond, rope=rope)
        return unpatchify(self.final(x, cond), self.patch_size, c, h, w)

    @torch.no_grad()
    def sample(self, y: Tensor, steps: int = 50, guidance: float = 1.0,
               guidance_interval: tuple[float, float] = (0.0, 1.0), shift: float = 1.0,
               guided_channels: int | None = None, noise: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Latents (normalised space) for labels y with the Euler sampler of ``diffusion.flow``;
        guidance acts on the first ``guided_channels`` channels (None: all), the other
        channels follow the conditional prediction."""
        shape = (y.shape[0], self.in_channels, self.input_size, self.input_size)
        if noise is None:
            noise = torch.randn(shape, device=y.device, generator=generator)
        null = torch.full_like(y, self.null_class)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            if guidance == 1.0 or not flow.in_guidance_interval(float(t[0]), guidance_interval):
                return self(x, t, y, drop_labels=False)
            both = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), drop_labels=False)
            cond, uncond = both.chunk(2)
            c = self.in_channels if guided_channels is None else int(guided_channels)
            return torch.cat([flow.guide(cond[:, :c], uncond[:, :c], guidance), cond[:, c:]], dim=1)

        return flow.euler_sample(velocity, noise, steps=steps, shift=shift)
