"""Rectified-flow utilities shared by FlexTok's decoder and the latent generator.

TIME CONVENTION (used everywhere in this project): t = 0 is DATA, t = 1 is NOISE.

    x_t = t * eps + (1 - t) * x0          eps ~ N(0, I)
    v   = d x_t / d t = eps - x0          (the velocity a model predicts)

Training: ``t = sample_time(...)`` (logit-normal: sigmoid of a normal), ``x_t =
interpolate(x0, eps, t)``, ``loss = flow_loss(model(x_t, t), velocity_target(x0, eps))``.
Sampling: ``euler_sample`` integrates from t = 1 (pure noise) down to t = 0 (data) with
``x_{t'} = x_t + (t' - t) * v(x_t, t)``. An optional time shift (SD3-style,
``t -> s t / (1 + (s - 1) t)``, s > 1 spends more steps near the noise end) and
classifier-free guidance ``u + s (c - u)`` on ALL channels (LightningDiT guides only
the first 3 channels, a DiT leftover: ``LatentDiT.sample(guided_channels=3)``), applied
only while t lies inside ``guidance_interval = (t_low, t_high)``; outside it the
conditional prediction is used. Setting ``t_high < 1`` switches guidance off at the
high-noise end.

``NormGuidance`` is the adaptive projected guidance (APG, Sadat et al. 2024,
arXiv:2410.02416) FlexTok's reference decodes with: the guidance direction ``c - u`` is
accumulated with momentum (-0.5), its norm per sample clipped at 2.5, and only its part
orthogonal to the conditional prediction is added: ``c + (s - 1) * orth``. It keeps
state across the steps of one sampling run: build one per run.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t of shape (B,)) -> velocity like x_t


def sample_time(batch_size: int, device: torch.device | str = "cpu", mean: float = 0.0, std: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Logit-normal t in (0, 1): ``sigmoid(n)``, ``n ~ N(mean, std^2)``; shape (B,), float32."""
    n = torch.randn(batch_size, device=device, generator=generator)
    return torch.sigmoid(mean + std * n)


def _expand(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = t * eps + (1 - t) * x0 (t = 0 data, t = 1 noise); t of shape (B,)."""
    t = _expand(t, x0)
    return t * eps + (1 - t) * x0


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """d x_t / dt = eps - x0."""
    return eps - x0


def flow_loss(velocity: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between predicted and target velocity, computed in fp32."""
    return (velocity.float() - target.float()).pow(2).mean()


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 time shift ``s t / (1 + (s - 1) t)``; keeps 0 and 1 fixed, s = 1 is the identity."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sampling_times(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """The ``steps + 1`` times visited by the Euler sampler, from 1 (noise) down to 0 (data)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def guide(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``u + s (c - u)`` on every channel; s = 1 returns c."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


class NormGuidance:
    """APG as in FlexTok's reference (``cfg_utils.normalized_guidance``), one per sampling run.

    ``__call__(cond, uncond, scale)`` with predictions (B, C, H, W): per sample, the
    running direction ``r = (c - u) + momentum * r`` (stored unclipped), clipped to norm
    ``norm_threshold`` over (C, H, W), split (in float64) into parts parallel and
    orthogonal to ``c``; returns ``c + (scale - 1) * (orth + eta * parallel)``.
    """

    def __init__(self, momentum: float = -0.5, eta: float = 0.0, norm_threshold: float = 2.5):
        self.momentum, self.eta, self.norm_threshold = float(momentum), float(eta), float(norm_threshold)
        self.running: Tensor | None = None

    def __call__(self, cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
        diff = cond - uncond
        if self.momentum != 0.0:
            self.running = diff if self.running is None else diff + self.momentum * self.running
            diff = self.running
        dims = tuple(range(1, cond.ndim))
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * torch.minimum(torch.ones_like(diff), self.norm_threshold / norm)
        unit = torch.nn.functional.normalize(cond.double().flatten(1), dim=1).view_as(cond)
        parallel = (diff.double() * unit).sum(dim=dims, keepdim=True) * unit
        orthogonal = diff.double() - parallel
        update = orthogonal.to(cond.dtype) + self.eta * parallel.to(cond.dtype)
        return cond + (scale - 1) * update


GUIDANCE_METHODS = ("cfg", "apg")


def in_guidance_interval(t: float, interval: tuple[float, float]) -> bool:
    low, high = interval
    return low <= t <= high


def euler_sample(velocity: VelocityFn, noise: Tensor, steps: int = 25, shift: float = 1.0,
                 guidance: float = 1.0, uncond_velocity: VelocityFn | None = None,
                 guidance_interval: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Integrate dx/dt = v from t = 1 (``noise``) to t = 0 and return the data estimate.

    ``velocity(x, t)`` is the conditional model, ``uncond_velocity(x, t)`` the
    unconditional one (needed only when ``guidance != 1``). Models that can batch both
    branches in one call should instead pass a single ``velocity`` that does the guidance
    itself (see ``LatentDiT.sample``).
    """
    if guidance != 1.0 and uncond_velocity is None:
        raise ValueError("guidance != 1 needs uncond_velocity (the model with its condition dropped).")
    times = sampling_times(steps, shift, device=noise.device)
    x = noise
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        t_batch = t.expand(x.shape[0])
        v = velocity(x, t_batch)
        if guidance != 1.0 and in_guidance_interval(float(t), guidance_interval):
            v = guide(v, uncond_velocity(x, t_batch), guidance)
        x = x + (t_next - t).to(x.dtype) * v
    return x
