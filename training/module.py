"""``TokenizerModule``: the one LightningModule that trains every tokenizer family.

It knows nothing about any family: it adds the generic losses of ``conf/loss``, the
adversarial loss of ``conf/gan`` and the regulariser of ``conf/regularizer`` to what
the tokenizer's ``forward`` returns, weights adaptive terms, steps the tokenizer and
discriminator optimizers (manual optimization), keeps an EMA copy and logs.

Step counting: with manual optimization every ``LightningOptimizer.step()`` advances
``global_step`` (Lightning issue 17958), so only the tokenizer optimizer goes through
Lightning; the discriminator's inner optimizer is stepped directly. Hence
``global_step`` == batches seen, and ``disc_start``, ``max_steps`` and checkpoint
intervals mean what they say.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from common.metrics import psnr_per_image, to_pixels
from tokenizers.contract import AdaptiveTerm, Tokenizer, TokenizerOutput
from training.acceleration import accelerate, images_channels_last
from common.ema import EMA
from training.resume import apply_configured_settings, configured_defaults, log_config_changes

log = logging.getLogger(__name__)


def adaptive_weight(nll: Tensor, loss: Tensor, param: Tensor, max_weight: float = 1e4) -> Tensor:
    """``||grad(nll, param)|| / (||grad(loss, param)|| + 1e-4)``, clamped to [0, max_weight],
    detached (taming's adaptive GAN weight; VA-VAE's adaptive VF weight)."""
    g_nll = torch.autograd.grad(nll, param, retain_graph=True)[0]
    g_loss = torch.autograd.grad(loss, param, retain_graph=True)[0]
    return (g_nll.norm() / (g_loss.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class NonFiniteLossError(RuntimeError):
    pass


class _StepBuffers:
    """The buffers of the trained modules at the start of a step, to put back when the step
    is skipped (a NaN batch would otherwise leave NaN batch-norm statistics behind)."""

    def __init__(self, tokenizer: nn.Module, gan: nn.Module | None):
        self.parts = [list(tokenizer.buffers()), list(gan.buffers()) if gan is not None else []]
        self.saved = [[b.clone() for b in part] for part in self.parts]

    def restore(self, discriminator_only: bool = False) -> None:
        for part, saved in list(zip(self.parts, self.saved))[1 if discriminator_only else 0:]:
            if part:
                torch._foreach_copy_(part, saved)


class TokenizerModule(pl.LightningModule):
    def __init__(
        self,
        tokenizer: Tokenizer,
        loss: nn.Module | None = None,
        gan: nn.Module | None = None,
        regularizer: nn.Module | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] = partial(torch.optim.Adam, lr=1e-4, betas=(0.9, 0.95)),
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        ema_decay: float | None = 0.999,
        grad_clip: float | None = 1.0,
        disc_grad_clip: float | None = 1.0,
        max_consecutive_nonfinite: int = 20,
        spectrum_bands: int = 8,
        channels_last: bool = False,
        recompute_norm_act: bool = False,
        activation_checkpointing: bool = False,
        compile: bool = False,
        lr_schedule: Callable[[int, int | None], float] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.tokenizer = tokenizer
        self.loss = loss
        self.gan = gan
        self.regularizer = regularizer
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer or optimizer
        # stateless (training/schedules.py): lr = configured lr * lr_schedule(step, max_steps)
        self.lr_schedule = lr_schedule
        # speed switches (training.acceleration): same outputs, other kernels / memory trade-offs
        self.channels_last = bool(channels_last) and accelerate(tokenizer, channels_last=True).get("channels_last", False)
        if self.channels_last and gan is not None:
            accelerate(gan, channels_last=True)
        self.ema = EMA(tokenizer, ema_decay) if ema_decay else None
        accelerate(tokenizer, activation_checkpointing=activation_checkpointing, compile=compile,  # not the EMA copy
                   recompute_norm_act=recompute_norm_act)
        self.grad_clip = grad_clip
        self.disc_grad_clip = disc_grad_clip
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.spectrum_bands = spectrum_bands
        self.run_config: dict | None = None  # set by the run builder; saved in checkpoints
        self.register_buffer("nonfinite_skipped", torch.zeros((), dtype=torch.long))
        self._consecutive_nonfinite = {"tokenizer": 0, "discriminator": 0}

    # -- models ---------------------------------------------------------------------
    @property
    def eval_tokenizer(self) -> Tokenizer:
        """The weights validation and evaluation use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.tokenizer

    def configure_optimizers(self):
        params = [p for p in self.tokenizer.parameters() if p.requires_grad]
        opt_g = self.optimizer_factory(params)
        if self.gan is None:
            return opt_g
        opt_d = self.disc_optimizer_factory(self.gan.discriminator.parameters())
        return [opt_g, opt_d]

    def _optimizers(self):
        opts = self.optimizers()
        if isinstance(opts, (list, tuple)):
            return opts[0], opts[1]
        return opts, None

    # -- losses ---------------------------------------------------------------------
    def reconstruction_loss(self, recon: Tensor, target: Tensor) -> Tensor:
        if self.loss is None:
            return torch.nn.functional.mse_loss(recon.float(), target.float())
        return self.loss.total(recon, target)

    def compute_losses(self, images: Tensor, out: TokenizerOutput, step: int, tokenizer: Tokenizer,
                       with_gan: bool = True) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        losses = dict(out.losses)
        logs: dict[str, Tensor] = {}
        nll = None
        if out.reconstruction is not None and self.loss is not None:
            terms = self.loss(out.reconstruction, images)
            losses.update(terms)
            nll = sum(terms.values())
        if self.regularizer is not None:
            losses.update(self.regularizer(tokenizer, images, out, self.reconstruction_loss))
        adaptive: dict[str, AdaptiveTerm] = dict(out.adaptive)
        if with_gan and self.gan is not None and out.reconstruction is not None and self.gan.active(step):
            g = self.gan.generator_loss(out.reconstruction, images)
            if self.gan.weighting == "adaptive":
                adaptive["gan"] = AdaptiveTerm(g, tokenizer.decoder_last_layer(), self.gan.disc_weight,
                                               self.gan.max_adaptive_weight,
                                               getattr(self.gan, "max_adaptive_weight_reduction", "mean"))
            else:
                losses["gan"] = self.gan.disc_weight * g
        for name, term in adaptive.items():
            if nll is not None and torch.is_grad_enabled() and nll.requires_grad:
                w = adaptive_weight(nll, term.loss, term.param, term.max_weight_for(images))
            else:
                w = torch.ones((), device=term.loss.device)
            logs[f"{name}_adaptive_weight"] = w
            losses[name] = w * term.weight * term.loss
        return losses, logs

    # -- training ---------------------------------------------------------------------
    def training_pair(self, images: Tensor) -> tuple[Tensor, TokenizerOutput]:
        """(targets, output) of this step: the plain forward, or the pair a regulariser runs
        the whole step on (EQ-VAE's paper variant: transformed or low-resolution images)."""
        pair = self.regularizer.training_pair(self.tokenizer, images) if self.regularizer is not None else None
        return pair if pair is not None else (images, self.tokenizer(images))

    def training_step(self, batch, batch_idx: int):
        images = images_channels_last(batch[0]) if self.channels_last else batch[0]
        opt_g, opt_d = self._optimizers()
        step = self.global_step  # == batches seen (see module docstring)
        if self.lr_schedule is not None:
            self._schedule_lr(step, opt_g, opt_d)

        if opt_d is not None:
            self.toggle_optimizer(opt_g)  # no discriminator gradients from the generator pass
        # Forward passes update buffers (batch-norm statistics, codebook usage) even when the
        # step is then skipped: keep them to put back, so no NaN reaches a checkpoint.
        buffers = _StepBuffers(self.tokenizer, self.gan)
        images, out = self.training_pair(images)
        losses, logs = self.compute_losses(images, out, step, self.tokenizer)
        total = sum(losses.values())
        finite = self._check_finite(total, losses)
        opt_g.zero_grad(set_to_none=True)
        if finite:
            self.manual_backward(total)
            if self.grad_clip:
                self._clip(opt_g, self.grad_clip)
            finite = self._gradients_finite(opt_g, losses)
        if finite:
            opt_g.step()
        else:
            buffers.restore()
            self._skip_step(opt_g)
        if opt_d is not None:
            self.untoggle_optimizer(opt_g)
        if finite and self.ema is not None:
            self.ema.update(self.tokenizer)

        d_logs: dict[str, Tensor] = {}
        if opt_d is not None and out.reconstruction is not None and self.gan.active(step) and finite:
            self.toggle_optimizer(opt_d)
            d_loss, d_extra = self.gan.discriminator_loss(images, out.reconstruction.detach(), step=step)
            opt_d.zero_grad(set_to_none=True)
            d_finite = self._check_finite(d_loss, {"disc_loss": d_loss}, part="discriminator")
            if d_finite:
                self.manual_backward(d_loss)
                if self.disc_grad_clip:
                    self._clip(opt_d, self.disc_grad_clip)
                d_finite = self._gradients_finite(opt_d, {"disc_loss": d_loss}, part="discriminator")
            if d_finite:
                opt_d.optimizer.step()  # the inner optimizer: must not advance global_step
            else:
                opt_d.zero_grad(set_to_none=True)
                buffers.restore(discriminator_only=True)
            self.untoggle_optimizer(opt_d)
            d_logs = {"disc_loss": d_loss.detach(), **{f"disc/{k}": v for k, v in d_extra.items()}}

        scalars = {f"loss/{k}": v.detach() for k, v in losses.items()}
        scalars["loss/total"] = total.detach()
        scalars.update({k: v for k, v in logs.items()})
        scalars.update({k: torch.as_tensor(v, dtype=torch.float32) for k, v in out.logs.items()})
        scalars.update(d_logs)
        scalars["nonfinite_skipped"] = self.nonfinite_skipped.float()
        self.log_dict({f"train/{k}": torch.as_tensor(v).float() for k, v in scalars.items()}, on_step=True,
                      on_epoch=False, prog_bar=False)
        self.log("loss", total.detach().float(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        skipped = getattr(getattr(self.trainer, "datamodule", None), "skipped_samples", None)
        if callable(skipped):
            self.log("data/skipped", float(skipped()), on_step=True, on_epoch=False, sync_dist=True,
                     reduce_fx="sum")  # per rank in the data module; summed over ranks here
        return total.detach()

    def _schedule_lr(self, step: int, *optimizers) -> None:
        if not hasattr(self, "_configured_lr"):  # the config's rates, not the (resumed) optimizers'
            factories = [self.optimizer_factory, self.disc_optimizer_factory]
            self._configured_lr = [configured_defaults(f)["lr"] for f in factories]
        factor = self.lr_schedule(step, self.trainer.max_steps)
        for optimizer, lr in zip(optimizers, self._configured_lr):
            if optimizer is not None:
                for group in getattr(optimizer, "optimizer", optimizer).param_groups:
                    group["lr"] = lr * factor
        self.log("train/lr_factor", factor, on_step=True, on_epoch=False)

    def _clip(self, optimizer, max_norm: float) -> None:
        """Clip the gradient norm of ``optimizer``'s parameters.

        Lightning refuses to clip for fused optimizers (they can unscale fp16 gradients
        inside their step); without a gradient scaler (fp32, bf16-mixed) there is nothing
        to unscale, so the gradients are clipped directly, exactly as Lightning would."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if not getattr(inner, "_step_supports_amp_scaling", False):
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
            return
        if str(self.trainer.precision) in ("16-mixed", "16", "16-true"):
            raise ValueError(
                "A fused optimizer with fp16 gradient scaling cannot be clipped here. Fix: use "
                "trainer.precision=bf16-mixed, or module.optimizer.fused=false module.disc_optimizer.fused=false."
            )
        params = [p for group in inner.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _skip_step(self, opt_g) -> None:
        # Advance the step counter without touching the weights, so a bad batch costs
        # one step and nothing else (no NaN reaches the weights or a checkpoint).
        opt_g.zero_grad(set_to_none=True)
        opt_g.step()  # no gradients -> Adam leaves parameters unchanged

    def _check_finite(self, total: Tensor, losses: dict[str, Tensor], part: str = "tokenizer") -> bool:
        # one decision for all ranks: a rank that skipped its backward while the others
        # all-reduce theirs would hang the job (no-op on one device)
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(total)), all=True):
            self._consecutive_nonfinite[part] = 0
            return True
        self.nonfinite_skipped += 1
        self._consecutive_nonfinite[part] += 1
        streak = self._consecutive_nonfinite[part]
        bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["gradients, or another rank's loss"]
        log.warning("Non-finite %s loss at step %d (terms: %s); step skipped (%d in a row).", part, self.global_step,
                    ", ".join(bad), streak)
        if streak >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{streak} consecutive non-finite {part} losses (terms: {', '.join(bad)}); {int(self.nonfinite_skipped)} "
                "steps skipped in all. Fix: lower the learning rate, use precision=bf16-mixed instead of 16-mixed, "
                "or enable QK-norm. No skipped step changed a weight or buffer: the checkpoints hold the last "
                "finite state, and resuming continues from the last one."
            )
        return False

    def _gradients_finite(self, optimizer, losses: dict[str, Tensor], part: str = "tokenizer") -> bool:
        """A finite loss can still give NaN/inf gradients (which clipping spreads to every
        weight). With fp16's GradScaler that is the scaler's job (it skips and lowers the scale)."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return True
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            return True
        return self._check_finite(torch.tensor(float("nan")), {"gradients": torch.tensor(float("nan"))}, part)

    # -- validation ---------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int):
        images = batch[0]
        if len(batch) > 1 and (batch[1] < 0).any():
            # label -1 marks padding rows that keep ranks in step (data.common.PADDING_LABEL)
            images = images[batch[1] >= 0]
            if images.shape[0] == 0:
                return
        if self.channels_last:
            images = images_channels_last(images)
        model = self.eval_tokenizer
        out = model(images)
        metrics: dict[str, Tensor] = {}
        losses, _ = self.compute_losses(images, out, self.global_step, model, with_gan=False)
        for k, v in losses.items():
            metrics[f"loss/{k}"] = v.detach().float()
        if out.reconstruction is not None:
            rec = out.reconstruction.float()
            metrics["mse"] = torch.nn.functional.mse_loss(rec, images.float())
            metrics["l1"] = torch.nn.functional.l1_loss(rec, images.float())
            # the evaluator's definition: per-image PSNR on rounded 8-bit pixels, then the mean
            metrics["psnr"] = psnr_per_image(to_pixels(rec), to_pixels(images)).mean().float()
        for k, v in out.logs.items():
            metrics[k] = torch.as_tensor(v, dtype=torch.float32, device=images.device)
        latents = out.latents
        if isinstance(latents, Tensor) and latents.dim() == 4:  # averaged over the whole split
            try:
                from tokenizers.spectrum import dct_band_energy
            except ImportError:  # pragma: no cover - spectrum module absent
                dct_band_energy = None
            if dct_band_energy is not None:
                _, hf = dct_band_energy(latents.float(), num_bands=self.spectrum_bands)
                metrics["latent_hf_share"] = torch.as_tensor(float(hf), device=images.device)
                _, hf_img = dct_band_energy(images.float(), num_bands=self.spectrum_bands)
                metrics["image_hf_share"] = torch.as_tensor(float(hf_img), device=images.device)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, on_step=False, on_epoch=True, sync_dist=True,
                      batch_size=images.shape[0])

    # -- checkpoints ---------------------------------------------------------------------
    def rebuilt_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of frozen networks loaded from their own weight files
        (``rebuilt_from_weight_file``, e.g. LPIPS' VGG16): built again from those files, so
        checkpoints leave them out (the demo's LPIPS alone was 59 MB of 137 MB)."""
        return tuple(f"{name}." for name, m in self.named_modules()
                     if name and getattr(m, "rebuilt_from_weight_file", False))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["config"] = self.run_config
        prefixes = self.rebuilt_prefixes()
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(prefixes)] if prefixes else []:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints without the rebuilt networks take them from this freshly built module
        # (strict loading still catches every other missing key); older checkpoints that
        # hold them load them as before.
        prefixes = self.rebuilt_prefixes()
        state = checkpoint.get("state_dict")
        if prefixes and state is not None:
            for key, value in self.state_dict().items():
                if key.startswith(prefixes) and key not in state:
                    state[key] = value
        # runs before Lightning loads the optimizer states: a learning rate (or betas, ...)
        # changed in the config on resume is applied, not silently replaced by the saved one
        factories = [self.optimizer_factory] + ([self.disc_optimizer_factory] if self.gan is not None else [])
        apply_configured_settings(checkpoint.get("optimizer_states", []), factories, ["tokenizer", "discriminator"],
                                  scheduled=("lr",) if self.lr_schedule is not None else ())
        log_config_changes(checkpoint.get("config"), self.run_config)
