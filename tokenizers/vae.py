"""Continuous tokenizers: the LDM KL autoencoder and VA-VAE (SPEC.md §3).

``AutoencoderKL`` composes the shared conv ``Encoder`` (with ``double_z``: mean and
log-variance) and ``Decoder`` of ``tokenizers.conv`` with LDM's 1x1 convs around the
latent. ``VAVAE`` adds the vision-foundation (VF) alignment loss against a frozen
teacher's patch features, returned as an adaptive term that the loop weights by a
gradient-norm ratio on the encoder's last layer.

How the reference's loss scale relates to this project's
---------------------------------------------------------
The LDM / VA-VAE reference sums its reconstruction loss (L1 + LPIPS, LPIPS broadcast to
every pixel) over the ``3 * H * W`` pixels of each image and averages over the batch; its
learned output log-variance stays 0 (it is not in the optimizer), so its objective is
``3HW * mean_rec + kl_weight * KL_sum + adaptive terms``. This project's
``ReconstructionLoss`` averages over pixels instead. The KL term here is the reference's
(summed over the latent's C*h*w elements, averaged over the batch). Consequences:

- adaptive terms (GAN generator term, VF loss) are unaffected: their weight is a ratio of
  gradient norms, so scaling the reconstruction rescales the weight and the product is
  the same, except at the clamp: the reference clamps the GAN ratio at 1e4 and the VF
  ratio at 1e8 on its summed loss, i.e. at 1e4 / (3HW) ~= 0.051 and 1e8 / (3HW) ~= 509
  in this project's units at 256 px. At 256 px the GAN clamp binds for most of training,
  so the reference's effective GAN weight is ``0.5 * 0.051``; ``max_adaptive_weight_reduction:
  sum`` (conf/gan, conf/tokenizer/vavae.yaml, the vae/vavae experiments) applies the
  published clamps with this conversion, from each step's image size;
- the KL term, with a constant weight, is ``3HW`` times stronger relative to the
  reconstruction than in the reference at the same ``kl_weight``. The reference's balance
  is ``kl_weight = 1e-6 / (3 * 256 * 256) ~= 5.1e-12`` here at 256 px. The config keeps
  the published 1e-6 as the default (the latent stays close to the prior, which is what
  the small CPU runs want); the reproduction experiments set the equivalent value.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenizers.contract import AdaptiveTerm, Tokenizer, TokenizerOutput, check_reduction
from tokenizers.conv import Decoder, Encoder


class DiagonalGaussian:
    """Posterior ``N(mean, exp(logvar))`` per latent element (LDM's diagonal Gaussian)."""

    def __init__(self, moments: Tensor, logvar_range: tuple[float, float] = (-30.0, 20.0)):
        self.mean, logvar = moments.chunk(2, dim=1)
        # the clamp keeps exp(logvar) finite early in training, as in LDM
        self.logvar = logvar.clamp(*logvar_range)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        # reparameterisation: the noise carries no gradient, mean and std do
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per image, summed over the latent's C, H, W: shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(Tokenizer):
    """LDM KL autoencoder: conv encoder -> 1x1 (2 z -> 2 embed) -> Gaussian -> 1x1 -> conv decoder.

    Args:
        encoder: ``tokenizers.conv.Encoder`` built with ``double_z=True`` (mean and log-variance).
        decoder: ``tokenizers.conv.Decoder``; its ``z_channels`` is the post-quant width.
        embed_dim: latent channels (32 for the reference f16d32).
        kl_weight: weight of the KL term (summed over the latent, averaged over the batch;
            see the module docstring for how it relates to the reference's pixel-summed loss).
        encode_mode: what ``encode`` / ``encode_latents`` return: ``"mean"`` (the posterior
            mode, deterministic) or ``"sample"`` (a reparameterised sample).
        sample_posterior: training-mode ``forward`` decodes a sample (True, as LDM) or the
            mean. In eval mode ``forward`` always decodes the mean, so validation metrics are
            deterministic.
        logvar_range: clamp of the log-variance.
    """

    discrete = False
    codebook_sizes: tuple[int, ...] = ()

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        embed_dim: int = 32,
        kl_weight: float = 1e-6,
        encode_mode: str = "mean",
        sample_posterior: bool = True,
        logvar_range: tuple[float, float] = (-30.0, 20.0),
    ):
        super().__init__()
        if encoder.out_channels % 2:
            raise ValueError(
                f"AutoencoderKL needs an encoder with double_z=True (mean and log-variance); got "
                f"out_channels={encoder.out_channels}. Fix: set encoder.double_z=true."
            )
        if encode_mode not in ("mean", "sample"):
            raise ValueError(f"encode_mode must be 'mean' or 'sample', got {encode_mode!r}.")
        self.encoder = encoder
        self.decoder = decoder
        self.embed_dim = embed_dim
        self.kl_weight = kl_weight
        self.encode_mode = encode_mode
        self.sample_posterior = sample_posterior
        self.logvar_range = (float(logvar_range[0]), float(logvar_range[1]))
        self.quant_conv = nn.Conv2d(encoder.out_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, decoder.z_channels, 1)

    # -- pieces -----------------------------------------------------------------------
    def posterior(self, images: Tensor) -> DiagonalGaussian:
        # fp32 moments: exp(logvar) and the KL sum lose too much in bf16
        return DiagonalGaussian(self.quant_conv(self.encoder(images)).float(), self.logvar_range)

    def _training_latent(self, posterior: DiagonalGaussian) -> Tensor:
        return posterior.sample() if (self.training and self.sample_posterior) else posterior.mode()

    def _kl_terms(self, posterior: DiagonalGaussian) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        kl = posterior.kl().mean()
        logs = {
            "kl": kl.detach(),
            "logvar": posterior.logvar.detach().mean(),
            "latent_std": posterior.mean.detach().std(),
        }
        return {"kl": self.kl_weight * kl}, logs

    # -- the contract -------------------------------------------------------------------
    def forward(self, images: Tensor, latent_transform=None) -> TokenizerOutput:
        posterior = self.posterior(images)
        z = self._training_latent(posterior)
        losses, logs = self._kl_terms(posterior)
        if latent_transform is not None:
            z = latent_transform(z)
        return TokenizerOutput(self.decode_latents(z), losses, logs, latents=z)

    def forward_transformed(self, images: Tensor, latent_transform) -> TokenizerOutput:
        return self(images, latent_transform=latent_transform)

    def encode(self, images: Tensor) -> Tensor:
        return self.encode_latents(images)

    def decode(self, tokens: Tensor, **options) -> Tensor:
        return self.decode_latents(tokens)

    def encode_latents(self, images: Tensor) -> Tensor:
        posterior = self.posterior(images)
        return posterior.mode() if self.encode_mode == "mean" else posterior.sample()

    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(latents.to(self.post_quant_conv.weight.dtype)))

    def decoder_last_layer(self) -> Tensor:
        return self.decoder.last_layer

    def encoder_last_layer(self) -> Tensor:
        # VA-VAE takes the adaptive VF weight on the encoder's output conv (before quant_conv)
        return self.encoder.conv_out.weight

    def token_shape(self, image_size: int) -> tuple[int, ...]:
        s = image_size // self.encoder.downsample_factor
        return (s, s)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        return (self.embed_dim, *self.token_shape(image_size))


# -- VA-VAE: the vision-foundation alignment loss -------------------------------------------
def marginal_cosine_loss(z: Tensor, features: Tensor, margin: float = 0.5) -> Tensor:
    """``mean_ij relu(1 - margin - cos(z_ij, f_ij))`` over batch and positions.

    z, features: (B, D, H, W) of the same shape; cosine along D. Positions whose
    similarity already exceeds ``1 - margin`` contribute nothing."""
    cos = F.cosine_similarity(z, features, dim=1)
    return F.relu(1.0 - margin - cos).mean()


def marginal_distance_matrix_loss(z: Tensor, features: Tensor, margin: float = 0.25) -> Tensor:
    """``mean relu(|S_z - S_f| - margin)`` with S the (N x N) cosine-similarity matrix of the
    N = H*W positions of each sample (z and features: (B, D, H, W))."""
    zn = F.normalize(z.flatten(2), dim=1)  # (B, D, N)
    fn = F.normalize(features.flatten(2), dim=1)
    s_z = zn.transpose(1, 2) @ zn  # (B, N, N)
    s_f = fn.transpose(1, 2) @ fn
    return F.relu((s_z - s_f).abs() - margin).mean()


class _HeldTeacher:
    """Holds a ready teacher module as a plain attribute (not a submodule), like
    ``TeacherHandle`` does for specs: not in checkpoints, parameters or the EMA copy."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self.embed_dim = int(teacher.embed_dim)

    def __call__(self, images: Tensor, **options):
        return self.teacher(images, **options)

    def __deepcopy__(self, memo) -> "_HeldTeacher":
        return self


def _teacher_handle(teacher: Any):
    """A teacher spec ``{name, weights, random}`` -> ``TeacherHandle``; a handle passes
    through; a ready module (tests) is held the same way, outside the module tree."""
    from tokenizers.teachers import TeacherHandle

    if isinstance(teacher, (TeacherHandle, _HeldTeacher)):
        return teacher
    if isinstance(teacher, Mapping):
        return TeacherHandle(teacher)
    if isinstance(teacher, nn.Module) and hasattr(teacher, "embed_dim"):
        return _HeldTeacher(teacher)
    raise TypeError(
        f"VAVAE.teacher must be a teacher spec {{name, weights, random}} or a teacher module, got "
        f"{type(teacher).__name__}. Fix: set tokenizer.teacher to a conf/teacher spec (e.g. teacher=dinov2_l)."
    )


def teacher_width(teacher: Any) -> int:
    """Feature width of a teacher (object or spec) without loading its weights, so a
    VA-VAE can be rebuilt for encoding and decoding on a machine without the teacher's
    weights; the teacher itself loads at the first VF loss."""
    if not isinstance(teacher, Mapping):
        return int(teacher.embed_dim)
    from tokenizers.teachers import teacher_embed_dim

    return teacher_embed_dim(teacher)


class VAVAE(AutoencoderKL):
    """VA-VAE: ``AutoencoderKL`` whose latent is aligned with a frozen teacher (DINOv2-L).

    The sampled latent z is projected by a bias-free 1x1 conv to the teacher width; the
    teacher's patch features (class token dropped) are resized to the latent grid when
    the grids differ. ``L_vf = cos_weight * L_mcos + distmat_weight * L_mdms`` goes to
    ``output.adaptive["vf"]`` with ``param = encoder_last_layer()`` and ``weight = vf_weight``
    (w_hyper): the loop multiplies it by ``||grad nll|| / (||grad L_vf|| + 1e-4)``, clamped
    to ``max_adaptive_weight`` and detached.

    Args (beyond ``AutoencoderKL``'s):
        teacher: a teacher spec ``{name, weights, random}`` for ``tokenizers.teachers.get_teacher``,
            a ``TeacherHandle``, or any module returning ``TeacherFeatures`` (tests).
        vf_weight: w_hyper (0.5 in stage 1 of the released schedule, 0.1 after).
        cos_margin, distmat_margin: m1 (0.5) and m2 (0.25); 0 disables the margin.
        cos_weight, distmat_weight: weights of the two terms inside L_vf (1 and 1).
        max_adaptive_weight, max_adaptive_weight_reduction: the clamp of the adaptive VF
            weight; with reduction ``sum`` it is read as published for a pixel-summed loss
            (the reference's 1e8) and converted (``AdaptiveTerm.max_weight_for``).
        teacher_input: how images reach the teacher: ``raw_bilinear`` as the reference (the
            [-1, 1] images bilinearly resized to the teacher's 224 px, no ImageNet
            mean/std: what the released model was trained with) or ``normalized`` (the
            teachers' usual input, ``tokenizers.teachers``).
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        teacher: Any,
        embed_dim: int = 32,
        kl_weight: float = 1e-6,
        vf_weight: float = 0.1,
        cos_margin: float = 0.5,
        distmat_margin: float = 0.25,
        cos_weight: float = 1.0,
        distmat_weight: float = 1.0,
        max_adaptive_weight: float = 1e4,
        max_adaptive_weight_reduction: str = "mean",
        teacher_input: str = "raw_bilinear",
        **kwargs,
    ):
        super().__init__(encoder, decoder, embed_dim=embed_dim, kl_weight=kl_weight, **kwargs)
        # built at the first VF loss: encoding / decoding never needs the teacher's weights
        if isinstance(teacher, nn.Module):  # held outside the module tree (not in checkpoints)
            teacher = _HeldTeacher(teacher)
        self._teacher_source = teacher
        self._teacher = None
        self.teacher_dim = teacher_width(teacher)
        self.vf_weight = vf_weight
        self.cos_margin = cos_margin
        self.distmat_margin = distmat_margin
        self.cos_weight = cos_weight
        self.distmat_weight = distmat_weight
        self.max_adaptive_weight = max_adaptive_weight
        self.max_adaptive_weight_reduction = check_reduction(max_adaptive_weight_reduction,
                                                             "tokenizer.max_adaptive_weight_reduction")
        if teacher_input not in ("raw_bilinear", "normalized"):
            raise ValueError(f"VAVAE.teacher_input must be 'raw_bilinear' or 'normalized', got {teacher_input!r}.")
        self.teacher_input = teacher_input
        self.vf_projection = nn.Conv2d(embed_dim, self.teacher_dim, 1, bias=False)

    @property
    def teacher(self):
        """The frozen teacher (a ``TeacherHandle``: not a submodule, shared by EMA copies)."""
        if self._teacher is None:
            handle = _teacher_handle(self._teacher_source)
            if int(handle.embed_dim) != self.teacher_dim:
                raise ValueError(
                    f"teacher width {handle.embed_dim} differs from the VF projection's {self.teacher_dim}. "
                    "Fix: use the teacher this VA-VAE was built for."
                )
            self._teacher = handle
        return self._teacher

    def teacher_features(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Teacher patch features as a (B, D, h, w) map resized to ``grid``."""
        with torch.no_grad():
            out = self.teacher(images, input_mode=self.teacher_input)
            b, n, d = out.patches.shape
            h, w = out.grid
            if h * w != n:
                raise ValueError(f"Teacher returned {n} patches for a {h}x{w} grid; they must agree.")
            feats = out.patches.transpose(1, 2).reshape(b, d, h, w).float()
            if (h, w) != tuple(grid):
                # antialias only acts when shrinking; growing is plain bilinear
                feats = F.interpolate(feats, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
        return feats

    def vf_loss(self, z: Tensor, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(cos_weight * L_mcos + distmat_weight * L_mdms, logs of both unweighted terms)."""
        projected = self.vf_projection(z).float()
        features = self.teacher_features(images, projected.shape[-2:])
        l_mcos = marginal_cosine_loss(projected, features, self.cos_margin)
        l_mdms = marginal_distance_matrix_loss(projected, features, self.distmat_margin)
        loss = self.cos_weight * l_mcos + self.distmat_weight * l_mdms
        return loss, {"vf_mcos": l_mcos.detach(), "vf_mdms": l_mdms.detach()}

    def forward(self, images: Tensor, latent_transform=None) -> TokenizerOutput:
        posterior = self.posterior(images)
        z = self._training_latent(posterior)
        losses, logs = self._kl_terms(posterior)
        vf, vf_logs = self.vf_loss(z, images)  # the untransformed latent against the image's features
        logs.update(vf_logs)
        if latent_transform is not None:
            z = latent_transform(z)
        adaptive = {
            "vf": AdaptiveTerm(
                loss=vf, param=self.encoder_last_layer(), weight=self.vf_weight, max_weight=self.max_adaptive_weight,
                max_weight_reduction=self.max_adaptive_weight_reduction,
            )
        }
        return TokenizerOutput(self.decode_latents(z), losses, logs, latents=z, adaptive=adaptive)

