"""Checks a composed config and the files it names before anything heavy happens.

``preflight(cfg)`` runs first in ``train.py``: data root and shard patterns, weight files,
checkpoint paths (``ckpt_path`` of another tokenizer, a missing ``init_from``), value
ranges (resolution vs downsample factor, codebook sizes, FSQ levels, batch size against
the data and memory) and device counts. It imports neither torch nor Lightning, so a
mistake is reported within a second or two, as one message that names the fix, before a
model is built, a logger started or data read. ``check_overrides`` does the same for
command-line keys that do not exist (``trainer.max_step`` -> did you mean
``trainer.max_steps``), which Hydra itself would only answer with "use +key".

``fail(error, run_dir)`` prints the message without a traceback (``HYDRA_FULL_ERROR=1``
or ``TOKBENCH_DEBUG=1`` re-raise it) and removes the run directory Hydra created for this
attempt when nothing but Hydra's own files is in it.
"""
from __future__ import annotations

import difflib
import glob
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

SHARD_WRITER = "python -m data.shards SRC_DIR OUT_DIR"
# One batch of float32 images may take at most this share of the machine's memory.
MAX_BATCH_MEMORY_SHARE = 0.25


class ConfigError(Exception):
    """A mistake in the configuration or the files it names; the message says the fix."""


def debug_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("TOKBENCH_DEBUG") == "1"


# --------------------------------------------------------------------------- the checks


def preflight(cfg: DictConfig) -> None:
    """Raise one ``ConfigError`` listing every problem found (each with its fix)."""
    problems: list[str] = []
    for check in (_check_data, _check_weight_files, _check_checkpoints, _check_model_values, _check_devices):
        try:
            check(cfg, problems)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n\n".join(problems))


def _get(node: Any, dotted: str, default: Any = None) -> Any:
    """``OmegaConf.select`` that treats ``???`` as absent and never raises on interpolations."""
    try:
        value = OmegaConf.select(node, dotted, default=default, throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve here (e.g. ${hydra:...} in tests)
        return default
    return default if value is None else value


def _choice(cfg: DictConfig, group: str, default: str) -> str:
    """The option chosen for a config group (``data=imagenet`` -> imagenet)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except Exception:
        return str(_get(cfg, f"hydra.runtime.choices.{group}") or default)


def _target(node: Any) -> str:
    return str(_get(node, "_target_", "")) if isinstance(node, DictConfig) else ""


def _world_size(cfg: DictConfig) -> int:
    devices, nodes = _get(cfg, "trainer.devices", 1), _get(cfg, "trainer.num_nodes", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    return devices * (nodes if isinstance(nodes, int) and nodes > 0 else 1)


def _expand(root: str | None, spec: Any) -> list[str]:
    """Shard pattern(s) -> local paths that exist (remote URLs are kept unchecked)."""
    from braceexpand import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    found: list[str] = []
    for part in specs:
        for alternative in str(part).split("::"):
            for entry in braceexpand(alternative):
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", entry) and not os.path.exists(entry):
                    found.append(entry)  # pipe:, s3:, https: ...
                    continue
                if root and not os.path.isabs(entry):
                    entry = os.path.join(root, entry)
                entry = os.path.expanduser(entry)
                found.extend(sorted(glob.glob(entry)) if any(c in entry for c in "*?[") else
                             [entry] if os.path.exists(entry) else [])
    return found


def _train_samples(root: str) -> int | None:
    """Training samples listed in ``root/shards.json`` (written by ``python -m data.shards``)."""
    try:
        index = json.loads((Path(root) / "shards.json").read_text())
        return int(index["splits"]["train"]["samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_data(cfg: DictConfig, problems: list[str]) -> None:
    data = cfg.get("data")
    if not isinstance(data, DictConfig):
        return
    target = _target(data)
    choice = _choice(cfg, "data", target.rsplit(".", 1)[-1])
    batch = _get(data, "batch_size", 1)
    resolution = _get(data, "resolution", 256)
    if not isinstance(batch, int) or batch < 1:
        problems.append(f"data.batch_size must be a positive integer, got {batch!r}. Fix: data.batch_size=32 (per rank).")
        return
    batch_bytes = batch * 3 * int(resolution) ** 2 * 4
    memory = _physical_memory()
    if memory and batch_bytes > MAX_BATCH_MEMORY_SHARE * memory:
        problems.append(
            f"data.batch_size={batch} at {resolution} px: one batch of images alone takes "
            f"{batch_bytes / 2**30:.1f} GiB, more than {MAX_BATCH_MEMORY_SHARE:.0%} of this machine's "
            f"{memory / 2**30:.0f} GiB. Fix: data.batch_size is per rank; use e.g. data.batch_size=32.")
        return
    samples: int | None = None
    if target.endswith("WebDatasetDataModule"):
        root = _get(data, "root")
        if not root:
            problems.append(
                f"data={choice} needs data.root, the folder of the webdataset shards.\n"
                f"Fix: write shards once with `{SHARD_WRITER}` (an image folder with class subfolders, or "
                f"train/ + val/), then add data.root=OUT_DIR. An image folder works directly with "
                f"data=imagefolder data.root=SRC_DIR.")
            return
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root) and not _is_url(root):
            problems.append(f"data.root={root} is not a folder. Fix: point data.root at the folder written by "
                            f"`{SHARD_WRITER}`.")
            return
        train_spec = _get(data, "train_shards", "train-*.tar")
        if not _expand(root, train_spec):
            problems.append(
                f"No training shards match data.train_shards={train_spec!r} under data.root={root}.\n"
                f"Fix: write them with `{SHARD_WRITER}` (OUT_DIR becomes data.root), or set "
                "data.train_shards to your shards' names (a brace pattern like 'train-{000000..000146}.tar' or a glob).")
            return
        samples = _train_samples(root)
    elif target.endswith("ImageFolderDataModule"):
        root = _get(data, "root")
        if not root or not os.path.isdir(os.path.join(os.path.expanduser(str(root)), "train")):
            problems.append(
                f"data={choice} needs data.root with a train/<class>/ folder, got data.root={root}.\n"
                "Fix: data.root=/datasets/imagenet (holding train/ and val/).")
            return
    elif target.endswith("DemoDataModule"):
        samples = 12 * int(_get(data, "train_crops", 64))  # twelve photographs (data/demo.py)
    elif target.endswith("SyntheticDataModule"):
        samples = int(_get(data, "num_train", 64))
    if samples is not None and batch * _world_size(cfg) > samples:
        problems.append(
            f"data.batch_size={batch} x {_world_size(cfg)} rank(s) is larger than the {samples} training images "
            f"of data={choice}. Fix: a smaller data.batch_size (per rank), or more data.")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _is_url(path: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)) is not None


def _walk(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every leaf; interpolations that cannot resolve are skipped."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            try:
                value = node[key]
            except Exception:
                continue
            yield from _walk(value, f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            try:
                value = node[i]
            except Exception:
                continue
            yield from _walk(value, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


WEIGHT_KEYS = ("weights",)
CHECKPOINT_KEYS = ("vae_ckpt", "tokenizer_ckpt")


def _check_weight_files(cfg: DictConfig, problems: list[str]) -> None:
    for key, value in _walk(cfg):
        if key.startswith("hydra.") or not isinstance(value, str) or not value or value == "???":
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf in WEIGHT_KEYS and not os.path.isfile(os.path.expanduser(value)):
            problems.append(f"{key}={value} does not exist. Fix: give the path of the weight file, or remove the "
                            f"setting ({key}=null) to use the default location.")
        elif leaf in CHECKPOINT_KEYS:
            try:
                find_checkpoint(value, key)
            except ConfigError as exc:
                problems.append(str(exc))
    perceptual = _get(cfg, "loss.perceptual")
    if isinstance(perceptual, DictConfig) and _get(perceptual, "on_missing") == "error" \
            and not _get(perceptual, "weights") and not _default_vgg_path().is_file():
        problems.append(
            f"LPIPS backbone weights not found at {_default_vgg_path()}.\n"
            "Fix: copy torchvision's vgg16-397923af.pth there (or set loss.perceptual.weights=PATH), "
            "or train without LPIPS: loss.perceptual.on_missing=disable.")


def _default_vgg_path() -> Path:
    """torch.hub.get_dir() / checkpoints / vgg16-397923af.pth, without importing torch."""
    if os.environ.get("TORCH_HOME"):
        hub = Path(os.environ["TORCH_HOME"]).expanduser() / "hub"
    else:
        cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
        hub = Path(cache).expanduser() / "torch" / "hub"
    return hub / "checkpoints" / "vgg16-397923af.pth"


RELEASED = re.compile(r"^pretrained:[^:=?]*(?:[:=]([^?]*))?")  # tokenizers.loading.parse_released


def find_checkpoint(path: str, key: str) -> Path | None:
    """A checkpoint file, or a run directory holding checkpoints/last.ckpt (or last.ckpt);
    None for a released checkpoint (``pretrained:<name>:<path>``) whose file exists."""
    released = RELEASED.match(str(path))
    if released:
        weights = released.group(1)
        if weights and not os.path.exists(os.path.expanduser(weights)):
            raise ConfigError(f"{key}={path}: {weights} does not exist. Fix: the path of the released weights.")
        return None
    p = Path(os.path.expanduser(str(path)))
    for candidate in (p, p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
        if candidate.is_file():
            return candidate
    what = "is a folder without checkpoints/last.ckpt" if p.is_dir() else "does not exist"
    raise ConfigError(f"{key}={path} {what}. Fix: give a .ckpt file or a run directory that holds "
                      "checkpoints/last.ckpt (e.g. logs/train/runs/<run>).")


def _check_checkpoints(cfg: DictConfig, problems: list[str]) -> None:
    tokenizer = _target(cfg.get("tokenizer"))
    for key in ("ckpt_path", "init_from"):
        value = _get(cfg, key)
        if not value:
            continue
        if str(value).startswith("SET_"):  # the placeholder of a staged experiment file
            problems.append(f"{key} is not set ({value}). Fix: {key}=<previous stage run dir>, e.g. "
                            f"{key}=logs/train/runs/<run>/checkpoints/last.ckpt.")
            continue
        try:
            path = find_checkpoint(value, key)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        saved = _saved_tokenizer_target(path) if path is not None else None
        if tokenizer and saved and saved != tokenizer:
            problems.append(
                f"{key}={value} holds a {saved.rsplit('.', 1)[-1]} checkpoint, but this run trains "
                f"{tokenizer.rsplit('.', 1)[-1]} ({tokenizer}). Fix: pick the tokenizer of that run "
                f"(tokenizer=...), or a checkpoint of this tokenizer.")


def _saved_tokenizer_target(path: Path) -> str | None:
    """The tokenizer ``_target_`` saved in a checkpoint's run config (None if unknown)."""
    import torch  # only when a checkpoint is named

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise ConfigError(f"{path} cannot be read as a checkpoint ({type(exc).__name__}: {exc}). "
                          "Fix: point at an intact .ckpt file (a truncated save leaves a .tmp file next to it).")
    return ((ckpt.get("config") or {}).get("tokenizer") or {}).get("_target_") if isinstance(ckpt, dict) else None


def _check_model_values(cfg: DictConfig, problems: list[str]) -> None:
    tokenizer = cfg.get("tokenizer")
    if not isinstance(tokenizer, DictConfig):
        return
    for key, value in _walk(tokenizer, "tokenizer."):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "codebook_size" and (not isinstance(value, int) or value < 2):
            problems.append(f"{key}={value}: a codebook needs at least 2 codes. Fix: e.g. {key}=1024.")
    for key in ("fsq_levels", "levels"):
        levels = _get(tokenizer, key)
        if levels is not None and isinstance(levels, ListConfig):
            if len(levels) == 0 or any(not isinstance(v, int) or v < 2 for v in levels):
                problems.append(
                    f"tokenizer.{key}={list(levels)}: FSQ needs at least one level and every level >= 2 "
                    f"(an empty list carries no information). Fix: e.g. tokenizer.{key}=[8,8,8,5,5,5].")
    resolution = _get(cfg, "data.resolution")
    factor, source = _downsample_factor(tokenizer)
    if isinstance(resolution, int) and factor and resolution % factor:
        problems.append(
            f"data.resolution={resolution} is not a multiple of the tokenizer's downsample factor {factor} "
            f"({source}). Fix: data.resolution={max(factor, resolution // factor * factor)} or "
            f"{(resolution // factor + 1) * factor}.")


def _downsample_factor(tokenizer: DictConfig) -> tuple[int | None, str]:
    mults = _get(tokenizer, "encoder.mults")
    if isinstance(mults, ListConfig) and len(mults) > 0:
        return 2 ** (len(mults) - 1), f"2^(len(tokenizer.encoder.mults) - 1) with mults={list(mults)}"
    # a tokenizer over the parameter-free latent stand-in (no VAE checkpoint) downsamples by its settings
    if _get(tokenizer, "stand_in_downsample") is not None and not _get(tokenizer, "vae_ckpt"):
        down, patch = _get(tokenizer, "stand_in_downsample", 8), _get(tokenizer, "patch_size", 1)
        if isinstance(down, int) and isinstance(patch, int):
            return down * patch, "tokenizer.stand_in_downsample x tokenizer.patch_size"
    return None, ""


def _check_devices(cfg: DictConfig, problems: list[str]) -> None:
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return
    devices, nodes = _get(trainer, "devices", 1), _get(trainer, "num_nodes", 1)
    accelerator = str(_get(trainer, "accelerator", "auto"))
    if isinstance(devices, int) and devices < 1 or isinstance(nodes, int) and nodes < 1:
        problems.append(f"trainer.devices={devices}, trainer.num_nodes={nodes}: both must be >= 1.")
        return
    tasks = os.environ.get("SLURM_NTASKS")
    if tasks and tasks.isdigit() and os.environ.get("SLURM_JOB_ID") and isinstance(devices, int) \
            and isinstance(nodes, int) and int(tasks) != devices * nodes:
        problems.append(
            f"This SLURM job has {tasks} tasks, but trainer.devices={devices} x trainer.num_nodes={nodes} "
            f"= {devices * nodes} ranks. Fix: submit with tasks_per_node = trainer.devices and nodes = "
            "trainer.num_nodes (hydra/launcher=slurm ties them), or change trainer.devices.")
    if accelerator in ("gpu", "cuda") and isinstance(devices, int):
        available = _gpu_count()
        if devices > available:
            available = max(available, _driver_gpu_count())  # confirm with the driver (error path only)
        if devices > available:
            choice = _choice(cfg, "trainer", "?")
            problems.append(
                f"trainer={choice} asks for {devices} GPU(s) per node, this machine has {available}.\n"
                f"Fix: trainer.devices={available}" if available else
                f"trainer={choice} asks for {devices} GPU(s), this machine has none.\n"
                "Fix: trainer=cpu (one process) or trainer=ddp_cpu (2 processes), or run on a GPU node.")


def _gpu_count() -> int:
    """GPUs this process may use, without importing torch (CUDA_VISIBLE_DEVICES, else the
    NVIDIA device files)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return len(entries)
    return len([p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)])


def _driver_gpu_count() -> int:
    """GPUs the NVIDIA driver lists (``nvidia-smi -L``); 0 without a driver."""
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


# --------------------------------------------------------------------------- reporting


def fail(error: BaseException, run_dir: str | os.PathLike | None = None) -> None:
    """Print the message (no traceback), remove this attempt's empty run dir, exit 2."""
    if run_dir is not None:
        remove_fresh_run_dir(run_dir)
    if debug_errors():
        raise error
    sys.stderr.write(f"Error: {error}\n(HYDRA_FULL_ERROR=1 shows the traceback.)\n")
    sys.stderr.flush()
    raise SystemExit(2)


# what Hydra (and the W&B id file, written when the logger is built) leave at start-up
HYDRA_FILES = {".hydra", "train.log", "evaluate.log", "generator.log", "wandb_run_id.txt"}


def remove_fresh_run_dir(run_dir: str | os.PathLike) -> bool:
    """Removes ``run_dir`` if it holds nothing but what Hydra writes at start-up (its
    config copy and the log): a failed start leaves no run directory behind, and a run
    directory with checkpoints or images is never touched."""
    from training.run_lock import LOCK_FILE, lock_is_held

    path = Path(run_dir)
    if not path.is_dir():
        return False
    # a run directory another live run holds (the refused second run's) is never fresh
    if lock_is_held(path) or any(entry.name not in HYDRA_FILES | {LOCK_FILE} for entry in path.iterdir()):
        return False
    shutil.rmtree(path, ignore_errors=True)
    parent = path.parent  # a sweep folder that held only this job
    if parent.name and parent.is_dir() and not any(parent.iterdir()) and "multiruns" in parent.parts:
        parent.rmdir()
    return True


def user_error(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain a user can fix from its message (missing files and
    config mistakes), unwrapping Hydra's InstantiationException; None for anything else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConfigError, FileNotFoundError, NotADirectoryError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# --------------------------------------------------------------------------- unknown keys


def check_overrides(config_dir: str | os.PathLike, config_name: str, argv: list[str]) -> None:
    """Compose the config with the command line's overrides once (Hydra's compose API, no
    torch); if a key or group does not exist, exit with the closest real one."""
    if any(a in ("-h", "--help", "--hydra-help", "--info", "--shell-completion", "-sc") or
           a.startswith(("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--info"))
           for a in argv):
        return
    overrides = [a for a in argv if not a.startswith("-")]
    if not overrides:
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    overrides = _first_sweep_values(overrides)
    if overrides is None:
        return
    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
            compose(config_name, overrides=overrides, return_hydra_config=True)
        return
    except (ConfigCompositionException, MissingConfigException) as exc:
        message = _did_you_mean(config_dir, config_name, overrides, exc)
    except Exception:
        return  # anything else: Hydra reports it the usual way
    if message:
        fail(ConfigError(message))


def _first_sweep_values(overrides: list[str]) -> list[str] | None:
    """Sweeps (a,b / range(...)) replaced by their first value: every job shares the keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return None  # a syntax error: Hydra's own message is the right one
    single = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
            if not values:
                return None
            single.append(f"{override.get_key_element()}={values[0]}")
        else:
            single.append(text)
    return single


def _did_you_mean(config_dir, config_name: str, overrides: list[str], exc: Exception) -> str | None:
    from hydra import compose, initialize_config_dir

    text = str(exc)
    bad = re.search(r"Could not override '([^']+)'", text) or re.search(r"Could not append to config\. An item is already at '([^']+)'", text)
    missing_option = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing_option:  # a group option that does not exist: Hydra lists them; add the closest
        group, option = missing_option.groups()
        options = sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
        hint = f" Did you mean {group}={close[0]}?" if close else ""
        return f"There is no {group}={option}.{hint} Available: {', '.join(options)}."
    if not bad:
        return None
    key = bad.group(1)
    others = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name, overrides=others, return_hydra_config=True)
    except Exception:
        return None
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key and "=" in o), "VALUE")
    candidates = [k for k, _ in _walk_keys(cfg) if not k.startswith("hydra.")]
    candidates += list(_get(cfg, "hydra.runtime.choices", {}).keys())
    closest = _closest(key, candidates)
    hint = f"Did you mean {closest}?" if closest else "No similar key exists."
    return (f"Unknown config key '{key}'. {hint}\n"
            f"`python {config_name}.py --cfg job` prints every key; to add a new key on purpose write +{key}={value}.")


def _walk_keys(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Every dotted key (inner nodes too), without resolving interpolations."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            yield path, None
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                yield from _walk_keys(child, path + ".")


def _closest(key: str, candidates: list[str]) -> str | None:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [c for c in candidates if (c.rsplit(".", 1)[0] if "." in c else "") == parent]
    for pool, cutoff in ((siblings, 0.6), (candidates, 0.75)):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=cutoff)
        if match:
            return match[0]
    leaf = key.rsplit(".", 1)[-1]  # the right name under another parent (max_steps -> trainer.max_steps)
    same_leaf = [c for c in candidates if difflib.SequenceMatcher(None, c.rsplit(".", 1)[-1], leaf).ratio() >= 0.85]
    return min(same_leaf, key=len) if same_leaf else None
