"""Write image folders into webdataset shards, and find / count shards when reading.

Usage::

    python -m data.shards SRC_DIR OUT_DIR [--maxcount 1000] [--val-fraction 0.01] [--verify]

SRC_DIR may be
- an ImageNet-style tree ``SRC/train/<class>/*`` (and optionally ``SRC/val/<class>/*``),
- a folder of class subfolders ``SRC/<class>/*``,
- a flat folder of images (one class, named after the folder).
When SRC has no ``val/`` folder of its own, a validation split is held out by itself:
``--val-fraction`` of every class (default 1 %, at least one image of every class that
has two or more), chosen at random with ``--seed`` and stated in the output;
``--val-fraction 0`` writes no validation split.

OUT_DIR then holds::

    train-000000.tar, train-000001.tar, ...   training split (samples in shuffled order)
    val-000000.tar, ...                       validation split (sorted order)
    classes.json                              class names; label i is classes[i]
    shards.json                               samples per shard, per split

Each sample is ``<key>.<jpg|png|webp>`` (the original file's bytes, not re-encoded;
other formats are converted to PNG) plus ``<key>.cls`` (the label as decimal text).
The key is the file's path relative to its split folder, extension dropped and dots
replaced by underscores (webdataset splits the key from the extension at the first dot).

``shards.json`` lets the reader split validation across ranks without scanning the
tar files; shards written by other tools are counted by a scan of their tar headers.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import random
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Sequence

import webdataset as wds
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

INDEX_FILE = "shards.json"
CLASSES_FILE = "classes.json"
INDEX_FORMAT = "tokbench-shards-v1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # kept byte for byte
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.01  # held out per class when the source has no val/ folder


class NoShardsMatched(FileNotFoundError):
    """A shard pattern matched no file at all (as opposed to some listed shards missing)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# --------------------------------------------------------------------------- reading side


def _is_url(spec: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", spec) is not None and not os.path.exists(spec)


def expand_shards(root: str | os.PathLike | None, spec: str | Sequence[str]) -> list[str]:
    """Shard names -> list of paths / URLs.

    ``spec`` is a list, or a string with brace ranges (``train-{000000..000146}.tar``),
    ``::``-separated alternatives, and ``*`` / ``?`` globs (local files, sorted).
    Relative entries are taken relative to ``root``.
    """
    entries: list[str] = []
    for part in [spec] if isinstance(spec, str) else list(spec):
        entries.extend(wds.shardlists.expand_urls(str(part)))  # "::" alternatives and brace ranges
    shards: list[str] = []
    for entry in entries:
        if not _is_url(entry) and not os.path.isabs(entry) and root is not None:
            entry = os.path.join(os.path.expanduser(str(root)), entry)
        if not _is_url(entry) and ("*" in entry or "?" in entry):
            shards.extend(sorted(glob.glob(os.path.expanduser(entry))))
        else:
            shards.append(entry)
    if not shards:
        raise NoShardsMatched(
            f"No shards matched {spec!r} under root {root!r}. Fix: write shards with "
            "`python -m data.shards SRC_DIR OUT_DIR` and set data.root=OUT_DIR, or point "
            "data.train_shards / data.val_shards at your shards (brace patterns like "
            "'train-{000000..000146}.tar' or globs like 'train-*.tar')."
        )
    missing = [s for s in shards if not _is_url(s) and not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards do not exist, first: {missing[0]}. "
            "Fix: check data.root and the brace range in the shard pattern."
        )
    return shards


def read_index(root: str | os.PathLike) -> dict:
    path = Path(os.path.expanduser(str(root))) / INDEX_FILE
    if not path.exists():
        return {}
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        log.warning("Ignoring %s: unknown format %r (expected %r).", path, index.get("format"), INDEX_FORMAT)
        return {}
    return index


def count_samples_in_tar(path: str) -> int:
    """Samples in a local shard, counted from its tar headers (file data is skipped)."""
    count, previous = 0, None
    with tarfile.open(path, mode="r:") as archive:
        for member in archive:
            if not member.isreg():
                continue
            key, _ = wds.tariterators.base_plus_ext(member.name)
            if key is None or os.path.basename(key).startswith("__"):
                continue  # metadata files, ignored by the reader too
            if key != previous:  # the reader groups consecutive files with the same key
                count, previous = count + 1, key
    return count


def shard_sample_counts(shards: Sequence[str], root: str | os.PathLike | None = None) -> list[int]:
    """Samples per shard: from ``root/shards.json`` where listed, else a header scan."""
    listed: dict[str, int] = {}
    if root is not None:
        for split in read_index(root).get("splits", {}).values():
            for name, count in split.get("shards", {}).items():
                listed[os.path.normpath(os.path.join(os.path.expanduser(str(root)), name))] = int(count)
    counts, scanned = [], 0
    for shard in shards:
        if not _is_url(shard) and os.path.normpath(shard) in listed:
            counts.append(listed[os.path.normpath(shard)])
        elif _is_url(shard):
            raise ValueError(
                f"Cannot count the samples of remote shard {shard} (needed to split validation evenly "
                f"across ranks). Fix: copy the validation shards to local disk, or put a {INDEX_FILE} "
                "next to them as written by `python -m data.shards`."
            )
        else:
            counts.append(count_samples_in_tar(shard))
            scanned += 1
    if scanned:
        log.info("Counted samples of %d shards by scanning their tar headers (no %s entry).", scanned, INDEX_FILE)
    return counts


# --------------------------------------------------------------------------- writing side


class SplitWriter:
    """Writes one split's samples into ``<split>-NNNNNN.tar`` shards, rotating at
    ``maxcount`` samples or ``maxsize`` bytes. Each shard is written under a temporary
    name and renamed when complete, so a crash never leaves a truncated shard behind."""

    def __init__(self, out_dir: str | os.PathLike, split: str, maxcount: int = 1000, maxsize: float = 1e9):
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}.")
        self.out_dir, self.split = Path(out_dir), split
        self.maxcount, self.maxsize = maxcount, maxsize
        self.counts: dict[str, int] = {}
        self._writer: wds.TarWriter | None = None
        self._partial: Path | None = None
        self._size = 0

    def write(self, key: str, image_ext: str, image_bytes: bytes, label: int) -> None:
        if self._writer is None or self.counts[self._name] >= self.maxcount or self._size >= self.maxsize:
            self._next_shard()
        self._writer.write({"__key__": key, image_ext: image_bytes, "cls": str(int(label)).encode()})
        self.counts[self._name] += 1
        self._size += len(image_bytes)

    def _next_shard(self) -> None:
        self._finish_shard()
        self._name = shard_name(self.split, len(self.counts))
        self._partial = self.out_dir / (self._name + ".partial")
        self._writer = wds.TarWriter(str(self._partial), encoder=False)
        self.counts[self._name] = 0
        self._size = 0

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            os.replace(self._partial, self.out_dir / self._name)
            self._writer = None

    def close(self) -> dict[str, int]:
        self._finish_shard()
        return dict(self.counts)


def write_index(out_dir: str | os.PathLike, classes: Sequence[str], splits: dict[str, dict[str, int]]) -> None:
    out_dir = Path(out_dir)
    (out_dir / CLASSES_FILE).write_text(json.dumps(list(classes), indent=1) + "\n")
    index = {
        "format": INDEX_FORMAT,
        "num_classes": len(classes),
        "splits": {
            split: {"samples": sum(counts.values()), "shards": counts} for split, counts in splits.items()
        },
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")


def encode_for_shard(path: Path, verify: bool = False) -> tuple[str, bytes]:
    """(extension, bytes) to store for an image file. JPEG/PNG/WebP keep their bytes;
    other formats are converted to PNG. Raises if the file is not a readable image."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        ext = STORED_FORMATS.get(image.format)
        if verify or ext is None:
            image = image.convert("RGB")  # full decode: catches truncated files
        if ext is None:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return "png", buffer.getvalue()
    return ext, data


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_source(src: Path, val_fraction: float | None = None, seed: int = 0) -> tuple[list[str], dict[str, list]]:
    """-> (class names, {split: [(path, label, key_root), ...]}) for the three layouts.

    ``val_fraction=None``: hold out ``DEFAULT_VAL_FRACTION`` when SRC has no val/ folder."""
    if not src.is_dir():
        raise NotADirectoryError(f"SRC_DIR {src} is not a directory.")
    if (src / "train").is_dir() and _class_folders(src / "train"):
        classes = [p.name for p in _class_folders(src / "train")]
        split_roots = {"train": src / "train"}
        if (src / "val").is_dir():
            split_roots["val"] = src / "val"
        splits = {name: _labelled(root, classes) for name, root in split_roots.items()}
        if "val" in splits:
            if val_fraction:
                log.warning("SRC has its own val/ folder: --val-fraction %s is ignored.", val_fraction)
            val_fraction = 0.0
    elif _class_folders(src):
        classes = [p.name for p in _class_folders(src)]
        splits = {"train": _labelled(src, classes)}
    else:
        classes = [src.resolve().name]
        splits = {"train": [(p, 0, src) for p in _images_in(src)]}
    if not splits["train"]:
        raise FileNotFoundError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {src}.")
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    if val_fraction > 0:
        if not 0 < val_fraction < 1:
            raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}.")
        train, val = _hold_out(splits["train"], val_fraction, seed)
        if val:
            splits["train"], splits["val"] = train, val
        else:
            log.warning("No class of %s has two images: no validation split is held out.", src)
    return classes, splits


def _labelled(split_root: Path, classes: Sequence[str]) -> list:
    known = {name: i for i, name in enumerate(classes)}
    samples = []
    for folder in _class_folders(split_root):
        if folder.name not in known:
            raise ValueError(
                f"Class folder {folder} does not exist in the training split; validation classes must be a "
                "subset of the training classes (labels are indices into the training class list)."
            )
        samples.extend((p, known[folder.name], split_root) for p in _images_in(folder))
    loose = [p for p in split_root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        log.warning("%d images directly in %s (not in a class folder) are ignored.", len(loose), split_root)
    return samples


def _hold_out(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Per-class random hold-out (stratified), deterministic in ``seed``: ``fraction`` of
    every class, at least one image of each class that has two or more (a class with a
    single image keeps it for training)."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_val = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return train, val


def sample_key(path: Path, split_root: Path) -> str:
    relative = path.relative_to(split_root).with_suffix("").as_posix()
    return re.sub(r"[.]", "_", relative).lstrip("_") or "image"


def write_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    val_fraction: float | None = None,
    seed: int = 0,
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write SRC's images as shards into OUT; returns the index written to shards.json
    (with ``held_out``: the fraction held out for validation, 0 when SRC has val/)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    classes, splits = scan_source(src, val_fraction, seed)
    has_val_folder = (src / "train").is_dir() and (src / "val").is_dir()
    held_out = 0.0 if has_val_folder or "val" not in splits else (
        DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out.iterdir() if p.name.endswith(".tar") or p.name in (INDEX_FILE, CLASSES_FILE)]
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds shards ({existing[0].name}, ...). Fix: choose an empty OUT_DIR or pass --overwrite."
            )
        for path in existing:
            path.unlink()
    written: dict[str, dict[str, int]] = {}
    for split, samples in splits.items():
        if split == "train":  # shuffled, so every shard mixes classes for the shuffle buffer
            random.Random(seed).shuffle(samples)
        writer = SplitWriter(out, split, maxcount=maxcount, maxsize=maxsize)
        failed, keys = [], set()
        for path, label, split_root in tqdm(samples, desc=f"{split} shards", unit="img", disable=not progress):
            try:
                ext, data = encode_for_shard(path, verify=verify)
            except Exception as exn:  # unreadable file: report, do not write
                failed.append((path, exn))
                continue
            key = sample_key(path, split_root)
            while key in keys:  # a.jpg and a.png in one folder would otherwise merge into one sample
                key += "_dup"
            keys.add(key)
            writer.write(key, ext, data, label)
        written[split] = writer.close()
        for path, exn in failed[:5]:
            log.warning("Skipped unreadable image %s: %s", path, exn)
        if failed:
            log.warning("%s: skipped %d unreadable images of %d.", split, len(failed), len(samples))
    write_index(out, classes, written)
    return {**read_index(out), "held_out": held_out}


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.shards",
        description="Write an image folder (ImageNet train/val tree, class subfolders, or a flat folder) "
        "into webdataset shards train-NNNNNN.tar / val-NNNNNN.tar with classes.json and shards.json.",
    )
    parser.add_argument("src", metavar="SRC_DIR", help="folder of images (see module docstring for layouts)")
    parser.add_argument("out", metavar="OUT_DIR", help="output folder for shards and index files")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most (default 1e9)")
    parser.add_argument(
        "--val-fraction", type=float, default=None,
        help=f"when SRC has no val/ folder: hold out this fraction of every class (at least one image) as "
        f"the val split (default {DEFAULT_VAL_FRACTION}; 0 = no val split)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train shuffle and the val hold-out")
    parser.add_argument("--verify", action="store_true", help="fully decode every image (slow); default: header check")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    args = parser.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        index = write_shards(
            args.src, args.out, maxcount=args.maxcount, maxsize=args.maxsize, val_fraction=args.val_fraction,
            seed=args.seed, verify=args.verify, overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as exn:
        sys.exit(f"error: {exn}")
    for split, info in index["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards")
    if index["held_out"]:
        print(f"{args.src} has no val/ folder: held out {index['held_out']:.1%} of every class (at least one "
              f"image per class, seed {args.seed}) as the validation split; --val-fraction changes it, 0 disables it.")
    elif "val" not in index["splits"]:
        print("No validation split written (--val-fraction 0): training will run without validation.")
    print(f"{index['num_classes']} classes; wrote {Path(args.out) / CLASSES_FILE} and {Path(args.out) / INDEX_FILE}")


if __name__ == "__main__":
    main()
