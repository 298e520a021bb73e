"""The training split encoded once with a frozen tokenizer: what every generator trains on.

Discrete tokenizers give token indices, stored as ``(N, K, L)`` integers (K codebooks per
position, L positions in generation order: raster order of an index map, or FlexTok's
register order); continuous ones give latents ``(N, C, H, W)`` plus per-channel mean / std.
``token_sequence`` converts a tokenizer's ``encode`` output to that layout
(``diffusion.samplers.contract_tokens`` converts back for ``decode``), from the tokenizer's
facts alone.

Encoding (``TokenCache.setup``): each rank reads its share of the training split (every
image exactly once across ranks, fixed order, centre crop, no flip) and writes a chunk file
every ``chunk_batches`` batches. A restarted job skips the chunks already written
(resumable); rank 0 writes ``stats.pt`` once all ranks are done, which marks the cache
complete. Later runs on the same tokenizer and data reuse it.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)

CACHE_VERSION = 2


# -- token layout ------------------------------------------------------------------------------
def token_sequence(tokens: Any) -> Tensor:
    """``encode`` output -> (B, K, L) int64: a (B, h, w) map or (B, L) sequence gives K = 1;
    a tuple of K maps (FQGAN branches, in branch order) gives K sub-tokens per position."""
    maps = list(tokens) if isinstance(tokens, (tuple, list)) else [tokens]
    return torch.stack([m.reshape(m.shape[0], -1).long() for m in maps], dim=1)


def index_dtype(vocab_sizes: Sequence[int]) -> torch.dtype:
    return torch.int16 if max(vocab_sizes) <= 2**15 else torch.int32


# -- the cache --------------------------------------------------------------------------------
def spec_fingerprint(spec: str) -> dict:
    """What identifies a tokenizer checkpoint: its path, size and mtime (a retrained
    checkpoint at the same path gets a new cache); a released spec by its text and file."""
    from tokenizers.loading import parse_released

    released = parse_released(str(spec))
    path = str(spec) if released is None else (released.path or "")
    info: dict[str, Any] = {"spec": str(spec)}
    if path and os.path.exists(path):
        st = os.stat(path)
        info.update(path=os.path.abspath(path), size=st.st_size, mtime=int(st.st_mtime))
    return info


def cache_key(spec: str, data_cfg: dict, ema: bool, kind: str) -> str:
    blob = json.dumps({"tokenizer": spec_fingerprint(spec), "data": data_cfg, "ema": ema, "kind": kind,
                       "version": CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def channel_sums(latents: Tensor) -> Tensor:
    """[sum over N, H, W per channel, sum of squares, count] in float64."""
    x = latents.double()
    positions = float(x.shape[0] * x.shape[2] * x.shape[3])
    return torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), torch.tensor([positions], dtype=torch.float64)])


def statistics_from_sums(sums: Tensor) -> tuple[Tensor, Tensor, int]:
    c = (sums.numel() - 1) // 2
    n = sums[-1]
    mean = sums[:c] / n
    var = (sums[c:2 * c] / n - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().clamp_min(1e-6).float(), int(n)


def channel_statistics(latents: Tensor, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and std over all ranks' latents (float64 sums, one all-reduce)."""
    from common.distributed import all_reduce_sum, reduce_device

    if latents.ndim != 4:
        raise ValueError(f"latents must be (N, C, H, W), got {tuple(latents.shape)}")
    return statistics_from_sums(all_reduce_sum(channel_sums(latents).to(reduce_device(device))).cpu())


class TokenCache(pl.LightningDataModule):
    """Cached token indices (``discrete``) or normalised latents of ``image_data``'s training
    split for a frozen tokenizer (see the module doc)."""

    def __init__(self, image_data: pl.LightningDataModule, tokenizer_spec: str, cache_dir: str, batch_size: int,
                 discrete: bool, vocab_sizes: Sequence[int] = (), num_workers: int = 0, ema: bool = True,
                 cache_dtype: str = "float16", limit_batches: int | None = None, chunk_batches: int = 100,
                 data_key: dict | None = None, seed: int = 0):
        super().__init__()
        self.image_data, self.tokenizer_spec = image_data, str(tokenizer_spec)
        self.cache_root = Path(os.path.expanduser(cache_dir))
        self.batch_size, self.num_workers, self.ema, self.seed = int(batch_size), int(num_workers), ema, seed
        self.discrete = bool(discrete)
        self.store_dtype = index_dtype(vocab_sizes) if self.discrete else getattr(torch, cache_dtype)
        self.limit_batches, self.chunk_batches = limit_batches, max(1, int(chunk_batches))
        self.data_key = data_key or {}
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.encoded_batches = 0  # batches this process encoded (0 when everything was cached)

    @property
    def cache_dir(self) -> Path:
        key = cache_key(self.tokenizer_spec, {**self.data_key, "limit_batches": self.limit_batches}, self.ema,
                        "indices" if self.discrete else "latents")
        return self.cache_root / key

    def _device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @torch.no_grad()
    def _encode(self, tokenizer, images: Tensor) -> Tensor:
        if self.discrete:
            return token_sequence(tokenizer.encode(images)).cpu().to(self.store_dtype)
        return tokenizer.encode_latents(images).float().cpu().to(self.store_dtype)

    def encode_rank(self, folder: Path, rank: int, world: int) -> None:
        """Write this rank's chunks, skipping those a previous (interrupted) job wrote."""
        from data.splits import labelled, training_split_once
        from tokenizers.loading import load_tokenizer

        mine = folder / f"rank{rank}-of-{world}"
        mine.mkdir(parents=True, exist_ok=True)
        if (mine / "done").is_file():
            return
        device, tokenizer = self._device(), None
        pending: list[tuple[Tensor, Tensor]] = []
        batches = training_split_once(self.image_data, self.limit_batches)
        chunk = 0
        from tqdm import tqdm

        total = self.limit_batches or getattr(batches, "__len__", lambda: None)()
        bar = tqdm(labelled(batches), total=total, desc="Encoding the training split (cache)", unit="batch",
                   disable=rank != 0, dynamic_ncols=True)  # minutes at ImageNet scale: show progress
        for i, (images, labels) in enumerate(bar):
            target = mine / f"chunk{i // self.chunk_batches:06d}.pt"
            chunk = i // self.chunk_batches
            if target.is_file():
                continue  # written before an interruption
            if tokenizer is None:
                tokenizer, _ = load_tokenizer(self.tokenizer_spec, ema=self.ema)
                tokenizer = tokenizer.to(device).eval()
            pending.append((self._encode(tokenizer, images.to(device).float()), labels.cpu()))
            self.encoded_batches += 1
            if (i + 1) % self.chunk_batches == 0:
                self._write_chunk(target, pending)
                pending = []
        if pending:
            self._write_chunk(mine / f"chunk{chunk:06d}.pt", pending)
        (mine / "done").write_text("complete\n")

    @staticmethod
    def _write_chunk(path: Path, items: list[tuple[Tensor, Tensor]]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"values": torch.cat([v for v, _ in items]), "labels": torch.cat([y for _, y in items])}, tmp)
        os.replace(tmp, path)  # a chunk is either complete or absent

    def setup(self, stage: str | None = None) -> None:
        if self.parts:
            return
        from common.distributed import all_reduce_sum, barrier, rank, reduce_device, world_size

        folder, world = self.cache_dir, world_size()
        done = folder / "stats.pt"
        if not done.is_file():
            self.encode_rank(folder, rank(), world)
            sums = torch.zeros(1, dtype=torch.float64)
            count = torch.zeros(1, dtype=torch.float64)
            for _, values, _ in self._chunks(folder / f"rank{rank()}-of-{world}"):
                count += values.shape[0]
                if not self.discrete:
                    part = channel_sums(values)
                    sums = part if sums.numel() == 1 else sums + part
            dev = reduce_device(self._device())
            count = all_reduce_sum(count.to(dev)).cpu()
            stats: dict[str, Any] = {"world_size": world, "count": int(count), "tokenizer": self.tokenizer_spec}
            if not self.discrete:
                if sums.numel() == 1:
                    raise ValueError(f"rank {rank()} has no training images to encode. Fix: use fewer ranks.")
                stats["mean"], stats["std"], stats["positions"] = statistics_from_sums(all_reduce_sum(sums.to(dev)).cpu())
            barrier()
            if rank() == 0:
                torch.save(stats, done)
                log.info("Encoded the training split into %s (%d images).", folder, stats["count"])
            barrier()
        stats = torch.load(done, map_location="cpu", weights_only=True)
        for w in range(stats["world_size"]):
            self.parts += [(v, y) for _, v, y in self._chunks(folder / f"rank{w}-of-{stats['world_size']}")]
        if not self.discrete:
            self.mean, self.std = stats["mean"], stats["std"]

    @staticmethod
    def _chunks(folder: Path):
        for path in sorted(folder.glob("chunk*.pt")):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield path, data["values"], data["labels"]

    def dataset(self) -> Dataset:
        return CachedTokens(self.parts, self.mean, self.std)

    def train_dataloader(self) -> DataLoader:
        from common.distributed import rank, world_size

        dataset = self.dataset()
        if len(dataset) < self.batch_size * world_size():
            raise ValueError(f"{len(dataset)} cached images cannot fill one batch of {self.batch_size} per rank. "
                             "Fix: lower generator.batch_size.")
        sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True,
                                     seed=self.seed, drop_last=True)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class CachedTokens(Dataset):
    """(int64 tokens (K, L) or normalised float latents (C, H, W), label) over the chunks."""

    def __init__(self, parts: list[tuple[Tensor, Tensor]], mean: Tensor | None = None, std: Tensor | None = None):
        self.parts = parts
        self.offsets = [0]
        for values, _ in parts:
            self.offsets.append(self.offsets[-1] + values.shape[0])
        self.mean = None if mean is None else mean.view(-1, 1, 1)
        self.std = None if std is None else std.view(-1, 1, 1)

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        p = bisect.bisect_right(self.offsets, i) - 1
        values, labels = self.parts[p]
        x, y = values[i - self.offsets[p]], labels[i - self.offsets[p]]
        if self.mean is None:
            return x.long(), y
        return (x.float() - self.mean) / self.std, y
