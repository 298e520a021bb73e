"""One pass over the validation split for one tokenizer, through the contract only.

Every number comes from ``encode`` / ``decode`` / ``encode_latents`` and the contract's
facts, so a new family appears in the report without changes here. Tokenizers whose
``decode`` takes ``num_tokens`` (FlexTok: 1D token sequences (B, R) decodable from any
prefix) are measured at each requested token count, one row each.

Per rank the pass keeps sums and counts (per-image PSNR / SSIM / LPIPS, code counts,
FID feature sums, spectrum sums, timings); they are reduced across ranks once at the
end, so N ranks give the numbers of one (the data split must hand each image to exactly
one rank: ``data.splits``).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from data.splits import real_images
from common.distributed import all_reduce_max, all_reduce_sum, reduce_device
from common.metrics import (
    CodeUsage,
    MeanMeter,
    as_index_maps,
    frechet_distance,
    psnr_per_image,
    ssim_per_image,
    to_pixels,
    to_uint8,
)


@dataclass
class EvalSettings:
    token_counts: list[int] | None = None  # variable-length tokenizers: prefixes to decode from
    decode_options: dict[str, Any] = field(default_factory=dict)  # e.g. FlexTok sampling steps
    spectrum_bands: int = 8
    autocast_dtype: torch.dtype | None = None  # bf16 on GPU; None = fp32


def supports_num_tokens(tokenizer) -> bool:
    """True when ``decode`` accepts ``num_tokens`` (decoding from a prefix of the tokens)."""
    try:
        return "num_tokens" in inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):
        return False


def resolve_token_counts(tokenizer, image_size: int, requested: list[int] | None) -> list[int | None]:
    """[None] (one full-length row) or the requested prefix lengths the tokenizer can decode."""
    if not supports_num_tokens(tokenizer):
        return [None]
    full = math.prod(tokenizer.token_shape(image_size))
    counts = sorted({int(k) for k in (requested or []) if 1 <= int(k) <= full} | {full})
    return counts


def parameter_count(tokenizer) -> int:
    return sum(p.numel() for p in tokenizer.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _RowState:
    """Sums for one output row (one token count)."""

    def __init__(self, fid, codebook_sizes):
        self.psnr, self.ssim, self.lpips = MeanMeter(), MeanMeter(), MeanMeter()
        self.fid = fid
        self.usage = CodeUsage(codebook_sizes) if codebook_sizes else None
        self.decode_seconds = 0.0
        self.decode_images = 0
        self.warmup_seconds = 0.0  # the first batch, used only when it is the only one
        self.warmup_images = 0


def _prefix(index_maps: list[Tensor], k: int | None) -> list[Tensor]:
    return index_maps if k is None else [m[:, :k] for m in index_maps]


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer,
    batches: Iterable,
    *,
    lpips,
    make_fid,
    settings: EvalSettings | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Metrics of ``tokenizer`` over ``batches`` (this rank's share of the split).

    ``make_fid()`` builds a fresh torchmetrics FID; ``lpips(x, y) -> (B,)``. Returns a
    dict with ``facts`` (per tokenizer), ``rows`` (one per token count) and the curves for
    the plots; identical on every rank."""
    from tokenizers.spectrum import dct_band_energy

    settings = settings or EvalSettings()
    device = torch.device(device)
    tokenizer = tokenizer.to(device).eval()
    lpips = lpips.to(device)
    discrete = bool(tokenizer.discrete)
    codebook_sizes = tuple(tokenizer.codebook_sizes) if discrete else ()

    rows: dict[int | None, _RowState] | None = None
    token_counts: list[int | None] = [None]
    image_size = None
    encode_seconds, encode_images, batch_index = 0.0, 0, 0
    encode_warmup = (0.0, 0)
    has_latent, latent_shape_seen = True, None
    spectrum_sums = {"latent": None, "images": None}
    spectrum_counts = {"latent": 0.0, "images": 0.0}
    hf_sums = {"latent": 0.0, "images": 0.0}
    autocast = (
        torch.autocast(device.type, dtype=settings.autocast_dtype)
        if settings.autocast_dtype is not None
        else torch.autocast(device.type, enabled=False)
    )

    for batch in batches:
        images = real_images(batch).to(device, non_blocking=True).float()
        b = images.shape[0]
        if b == 0:  # a batch made only of padding (the last one of a rank)
            continue
        if image_size is None:
            if images.shape[-1] != images.shape[-2]:
                raise ValueError(f"the evaluator expects square images, got {tuple(images.shape[-2:])}")
            image_size = images.shape[-1]
            token_counts = resolve_token_counts(tokenizer, image_size, settings.token_counts)
            rows = {k: _RowState(make_fid().to(device), codebook_sizes) for k in token_counts}
        # the first batch warms up kernels and caches: timed only when it is the only one
        timed = batch_index > 0
        targets = to_pixels(images)
        target_u8 = targets.to(torch.uint8)

        _sync(device)
        start = time.perf_counter()
        with autocast:
            tokens = tokenizer.encode(images)
        _sync(device)
        if timed:
            encode_seconds += time.perf_counter() - start
            encode_images += b
        else:
            encode_warmup = (time.perf_counter() - start, b)
        index_maps = as_index_maps(tokens, len(codebook_sizes)) if discrete else None

        first_fid = rows[token_counts[0]].fid
        first_fid.update(target_u8, real=True)
        for k, row in rows.items():
            options = dict(settings.decode_options)
            if k is not None:
                options["num_tokens"] = k
            _sync(device)
            start = time.perf_counter()
            with autocast:
                reconstruction = tokenizer.decode(tokens, **options)
            _sync(device)
            if timed:
                row.decode_seconds += time.perf_counter() - start
                row.decode_images += b
            else:
                row.warmup_seconds, row.warmup_images = time.perf_counter() - start, b
            reconstruction = reconstruction.float()
            prediction = to_pixels(reconstruction)
            row.psnr.update(psnr_per_image(prediction, targets))
            row.ssim.update(ssim_per_image(prediction, targets))
            row.lpips.update(lpips(prediction / 127.5 - 1, targets / 127.5 - 1))
            row.fid.update(to_uint8(reconstruction), real=False)
            if row.usage is not None:
                row.usage.update(_prefix(index_maps, k))

        spectra = [("images", images)]
        if has_latent:
            try:
                with autocast:
                    latents = tokenizer.encode_latents(images)
                spectra.append(("latent", latents.float()))
                if latent_shape_seen is None:
                    latent_shape_seen = tuple(latents.shape[1:])
            except NotImplementedError:  # no spatial latent (FlexTok's 1D tokens): no latent spectrum
                has_latent = False
        for name, maps in spectra:
            bands, hf = dct_band_energy(maps, num_bands=settings.spectrum_bands)
            bands = bands.double().cpu() * b  # per-batch means, weighted by images
            spectrum_sums[name] = bands if spectrum_sums[name] is None else spectrum_sums[name] + bands
            spectrum_counts[name] += b
            hf_sums[name] += hf * b
        batch_index += 1

    if rows is None:
        raise RuntimeError(
            "This rank received no validation images. Fix: check data.val split / max_images "
            "(every rank needs at least one batch)."
        )
    return _finalise(
        tokenizer, rows, token_counts, image_size, device, (encode_seconds, encode_images), encode_warmup,
        spectrum_sums, spectrum_counts, hf_sums, latent_shape_seen, codebook_sizes,
    )


def _latent_shape(tokenizer, image_size: int) -> list[int] | None:
    try:
        return list(tokenizer.latent_shape(image_size))
    except NotImplementedError:  # tokenizers without a spatial latent (FlexTok)
        return None


def _throughput(timed: tuple[float, int], warmup: tuple[float, int], dev: torch.device) -> float | None:
    """Images per second per device over the timed batches of all ranks; when the split is
    a single batch per rank, its warm-up-inclusive time is all there is."""
    packed = all_reduce_sum(torch.tensor([*timed, *warmup], dtype=torch.float64, device=dev)).cpu()
    seconds, images = (packed[0], packed[1]) if packed[1] > 0 else (packed[2], packed[3])
    return float(images / seconds) if seconds > 0 else None


def _finalise(tokenizer, rows, token_counts, image_size, device, encode_timed, encode_warmup,
              spectrum_sums, spectrum_counts, hf_sums, latent_shape_seen, codebook_sizes):
    dev = reduce_device(device)
    # real-image FID statistics were accumulated once; every token count compares against them
    first = rows[token_counts[0]].fid
    for k in token_counts[1:]:
        fid = rows[k].fid
        fid.real_features_sum = first.real_features_sum.clone()
        fid.real_features_cov_sum = first.real_features_cov_sum.clone()
        fid.real_features_num_samples = first.real_features_num_samples.clone()

    encode_throughput = _throughput(encode_timed, encode_warmup, dev)
    spectrum = {"latent": None}
    for name in ("latent", "images"):
        if spectrum_sums[name] is None:
            continue
        packed = torch.cat([spectrum_sums[name], torch.tensor([hf_sums[name], spectrum_counts[name]], dtype=torch.float64)])
        packed = all_reduce_sum(packed.to(dev)).cpu()
        spectrum[name] = {"bands": (packed[:-2] / packed[-1]).tolist(), "high_frequency_share": float(packed[-2] / packed[-1])}

    full_tokens = math.prod(tokenizer.token_shape(image_size))
    bits_full = tokenizer.bits_per_image(image_size)
    result_rows, counts_out = [], {}
    for k in token_counts:
        row = rows[k]
        n_images = int(all_reduce_sum(row.psnr.count.to(dev)).item())
        fraction = 1.0 if k is None else k / full_tokens
        out = {
            "num_tokens": full_tokens if k is None else k,
            "tokens_per_image": tokenizer.tokens_per_image(image_size) * fraction,
            "bits_per_image": None if bits_full is None else bits_full * fraction,
            "num_images": n_images,
            "psnr": row.psnr.compute(device),
            "ssim": row.ssim.compute(device),
            "lpips": row.lpips.compute(device),
            "rfid": frechet_distance(row.fid),
            "encode_images_per_s": encode_throughput,
            "decode_images_per_s": _throughput((row.decode_seconds, row.decode_images),
                                               (row.warmup_seconds, row.warmup_images), dev),
        }
        out["tokens_per_image"] = int(round(out["tokens_per_image"]))
        if row.usage is not None:
            counts = row.usage.synced_counts(device)
            out["codebook_usage"] = [CodeUsage.usage(c) for c in counts]
            out["perplexity"] = [CodeUsage.perplexity(c) for c in counts]
            if k == token_counts[-1]:  # the full-length row (the JSON stays small for 64k-code FSQ at many k)
                counts_out[out["num_tokens"]] = [c.tolist() for c in counts]
        else:
            out["codebook_usage"], out["perplexity"] = None, None
        result_rows.append(out)

    facts = {
        "family": type(tokenizer).__name__,
        "discrete": bool(tokenizer.discrete),
        "codebook_sizes": list(codebook_sizes),
        "resolution": image_size,
        "token_shape": list(tokenizer.token_shape(image_size)),
        "latent_shape": _latent_shape(tokenizer, image_size),
        "latent_shape_measured": None if latent_shape_seen is None else list(latent_shape_seen),
        "parameters": parameter_count(tokenizer),
        "variable_length": token_counts != [None],
    }
    return {"facts": facts, "rows": result_rows, "spectrum": spectrum, "code_counts": counts_out}


@torch.no_grad()
def reconstruct(tokenizer, images: Tensor, token_counts: list[int | None], decode_options: dict | None = None,
                device: torch.device | str = "cpu") -> dict[int | None, Tensor]:
    """Reconstructions of fixed ``images`` (for the grid), one per token count, on CPU."""
    device = torch.device(device)
    tokenizer = tokenizer.to(device).eval()
    x = images.to(device).float()
    tokens = tokenizer.encode(x)
    out = {}
    for k in token_counts:
        options = dict(decode_options or {})
        if k is not None:
            options["num_tokens"] = k
        out[k] = tokenizer.decode(tokens, **options).float().clamp(-1, 1).cpu()
    return out
