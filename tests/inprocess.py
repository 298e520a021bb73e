"""In-process runs of the real training code for effect tests (no subprocess start-up):
tiny TokenizerModules, a loader of identical batches, snapshots of the full training
state, and ``train(cfg)`` from a Hydra composition as ``train.py`` builds it."""
from __future__ import annotations

import copy
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


# -- tiny models ----------------------------------------------------------------------------
def tiny_vqgan(seed: int = 0, codebook_size: int = 32):
    from tokenizers.conv import Decoder, Encoder
    from tokenizers.quantizers import VectorQuantizer
    from tokenizers.vqgan import VQGAN

    torch.manual_seed(seed)
    return VQGAN(Encoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=8),
                 Decoder(width=8, mults=(1, 2), num_res_blocks=1, z_channels=8),
                 VectorQuantizer(codebook_size=codebook_size, code_dim=4))


def tiny_gan(disc_start: int = 0, **kw):
    from tokenizers.gan import NLayerDiscriminator, PatchGANHinge

    # BatchNorm: running statistics are part of the state that must survive a resume
    return PatchGANHinge(NLayerDiscriminator(ndf=4, n_layers=1, norm="batch"), disc_start=disc_start, **kw)


def tiny_module(seed: int = 0, disc_start: int = 0, ema_decay: float = 0.9, **kw):
    from tokenizers.losses import ReconstructionLoss
    from training.module import TokenizerModule

    tokenizer = tiny_vqgan(seed)
    torch.manual_seed(seed + 100)
    return TokenizerModule(tokenizer, ReconstructionLoss(perceptual_weight=0), tiny_gan(disc_start),
                           ema_decay=ema_decay, **kw)


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def repeated_batches(batch: int = 2, size: int = 16, count: int = 64) -> DataLoader:
    """Every batch holds the same images: a resumed run sees the data an uninterrupted run
    sees whatever the loader position, so their states can be compared exactly."""
    x = images(batch, size).repeat(count, 1, 1, 1)
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch, shuffle=False)


def trainer(max_steps: int, callbacks=(), **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                num_sanity_val_steps=0, deterministic=True)
    args.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **args)


# -- the training state, tensor by tensor ---------------------------------------------------
def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def persistent_buffers(module: torch.nn.Module):
    """(name, buffer) of the buffers a checkpoint holds (not the ``persistent=False`` ones,
    e.g. the quantizer's recent-usage window)."""
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def training_state(trainer: pl.Trainer, module) -> dict:
    """Everything a resume must bring back, read from the live objects (not from a file):
    module tensors by name (tokenizer, EMA copy, discriminator incl. BatchNorm statistics),
    the EMA copy's own parameters and buffers, every optimizer's state, the step."""
    state = {
        "step": trainer.global_step,
        "module": {k: _clone(v) for k, v in module.state_dict().items()},
        "optimizers": [_clone(opt.state_dict()) for opt in trainer.optimizers],
    }
    if getattr(module, "ema", None) is not None:
        state["ema"] = {**{f"p.{n}": _clone(p) for n, p in module.ema.module.named_parameters()},
                        **{f"b.{n}": _clone(b) for n, b in persistent_buffers(module.ema.module)},
                        "num_updates": _clone(module.ema.num_updates)}
    return state


def assert_same(a, b, path: str = "state") -> None:
    """Exact equality of nested dicts / lists of tensors and plain values, naming the first
    difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert torch.equal(a, b), f"{path}: values differ (max |diff| {float((a.double() - b.double()).abs().max()):.3g})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ: {sorted(set(a) ^ set(b))[:6]}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


class StateAtTrainStart(pl.Callback):
    """Records the training state right after Lightning restored a checkpoint (the first
    training batch starts after every restore hook has run)."""

    def __init__(self):
        self.state: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.state is None:
            self.state = training_state(trainer, pl_module)


# -- the real entry point, in process --------------------------------------------------------
def compose_train(run_dir: Path, overrides: list[str]):
    """The config ``python train.py hydra.run.dir=RUN_DIR OVERRIDES`` runs with (Hydra's
    runtime set, the hydra node dropped as the app sees it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.run.dir={run_dir}", f"paths.output_dir={run_dir}", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# a run of the real config that takes about a second: synthetic data, no LPIPS, no grids
# (and logger=none unless the test picks one)
FAST_RUN = ["debug=smoke", "data=synthetic", "data.batch_size=2", "loss.perceptual_weight=0", "loss.perceptual=null",
            "cpu_threads=1", "gan.discriminator.ndf=8", "gan.discriminator.n_layers=2",
            "callbacks.reconstruction_grid=null", "callbacks.progress_bar=null",
            "trainer.enable_progress_bar=false", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
            "+trainer.enable_model_summary=false"]


class Probe(StateAtTrainStart):
    """``StateAtTrainStart`` built by Hydra from ``+callbacks.probe``; the last one built is
    ``Probe.last``."""

    last: "Probe | None" = None

    def __init__(self):
        super().__init__()
        Probe.last = self


def train_in_process(run_dir: Path, overrides: list[str], probe: bool = False):
    """``training.run.train`` on the composed config (``FAST_RUN`` first); with ``probe`` a
    ``Probe`` callback records the state at the first training batch (``Probe.last``)."""
    from training import run

    extra = ["+callbacks.probe={_target_: inprocess.Probe}"] if probe else []
    if not any(o.startswith("logger=") for o in overrides):
        extra.append("logger=none")
    Probe.last = None
    cfg = compose_train(run_dir, [*FAST_RUN, *overrides, *extra])
    return run.train(cfg), cfg
