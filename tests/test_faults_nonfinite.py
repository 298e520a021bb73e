"""Fault table (docs/faults.md): non-finite losses. A step with a NaN/inf loss is skipped and
counted, the run halts after ``module.max_consecutive_nonfinite`` in a row, and no checkpoint
ever holds a non-finite tensor: the one left is the last finite state, buffers (batch-norm
statistics of the discriminator, codebook usage) and discriminator included."""
from __future__ import annotations

import copy

import pytest
import torch

from data.synthetic import ProceduralImages
from fault_helpers import load, non_finite_tensors, run
from training.checkpoints import AtomicCheckpointIO
from training.module import NonFiniteLossError

TRAIN_SEED = 0  # SyntheticDataModule draws its training images with seed 2 * data.seed


def test_a_nan_streak_halts_with_every_checkpoint_finite_and_the_last_finite_state_kept(tmp_path, monkeypatch):
    original = ProceduralImages.__getitem__
    served = {"train": 0}

    def nan_from_the_third_batch(self, index):
        image, label = original(self, index)
        if self.seed == TRAIN_SEED and index >= 0:
            served["train"] += 1
            if served["train"] > 2 * 2:  # batches of 2: steps 0 and 1 are finite, then NaN
                image = torch.full_like(image, float("nan"))
        return image, label

    saved: list[dict] = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def keep_a_copy(self, checkpoint, path, storage_options=None):
        saved.append(copy.deepcopy({k: checkpoint[k] for k in ("global_step", "state_dict", "optimizer_states")}))
        return real_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(ProceduralImages, "__getitem__", nan_from_the_third_batch)
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", keep_a_copy)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        run(tmp_path, "trainer.max_steps=10", "module.max_consecutive_nonfinite=3",
            "callbacks.model_checkpoint.every_n_train_steps=1")

    assert [c["global_step"] for c in saved] == [1, 2, 3, 4]  # steps 2 and 3 skipped, the third NaN halts
    for checkpoint in saved:
        assert non_finite_tensors(checkpoint) == [], f"step {checkpoint['global_step']}"
    last_finite = saved[1]["state_dict"]
    for checkpoint in saved[2:]:  # saved during the streak: the same weights and buffers
        state = checkpoint["state_dict"]
        changed = [k for k in last_finite if k != "nonfinite_skipped" and not torch.equal(state[k], last_finite[k])]
        assert changed == [], f"step {checkpoint['global_step']} changed {changed[:5]}"
    assert [int(c["state_dict"]["nonfinite_skipped"]) for c in saved] == [0, 0, 1, 2]  # counted
    on_disk = load(tmp_path / "checkpoints" / "last.ckpt")
    assert on_disk["global_step"] == 4
    # weights, EMA, discriminator, buffers, optimizer moments (ModelCheckpoint's own
    # bookkeeping keeps an inf "best score" sentinel, which is not training state)
    assert non_finite_tensors({k: on_disk[k] for k in ("state_dict", "optimizer_states")}) == []


class NaNGradientAt(torch.nn.Module):
    """A pixel loss whose value stays finite while its gradient is NaN at the given calls
    (0 * sqrt(0): value 0, gradient 0 * inf)."""

    def __init__(self, bad_calls: set[int]):
        super().__init__()
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, recon, target):
        self.calls += 1
        value = ((recon - target) ** 2).mean()
        if self.calls in self.bad_calls:
            value = value + 0 * torch.sqrt((recon * 0).sum())
        return {"pixel": value}

    def total(self, recon, target):
        return sum(self(recon, target).values())


def test_a_finite_loss_with_non_finite_gradients_is_skipped_too():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from test_module import tiny_vqgan
    from training.module import TokenizerModule

    module = TokenizerModule(tiny_vqgan(), NaNGradientAt({2}), None, grad_clip=1.0)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(images, torch.zeros(8, dtype=torch.long)), batch_size=2))
    assert trainer.global_step == 4 and int(module.nonfinite_skipped) == 1
    assert non_finite_tensors(dict(module.state_dict())) == []  # clipping did not spread NaN into the weights


def test_a_non_finite_discriminator_loss_is_skipped_counted_and_leaves_its_statistics():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from test_module import tiny_vqgan
    from tokenizers.gan import NLayerDiscriminator, PatchGANHinge
    from training.module import TokenizerModule

    class NaNDiscriminatorAt(PatchGANHinge):
        """Its discriminator sees NaN real images at the given calls (BatchNorm in train mode)."""

        def __init__(self, bad_calls):
            super().__init__(NLayerDiscriminator(ndf=4, n_layers=1, norm="batch"), disc_start=0)
            self.bad_calls, self.calls, self.at_step_start = bad_calls, 0, None

        def generator_loss(self, fake, real):
            self.at_step_start = copy.deepcopy(self.discriminator.state_dict())  # before this step's forwards
            return super().generator_loss(fake, real)

        def discriminator_loss(self, real, fake, step=None):
            self.calls += 1
            if self.calls in self.bad_calls:
                self.before_bad = self.at_step_start
                real = torch.full_like(real, float("nan"))
            return super().discriminator_loss(real, fake, step)

    gan = NaNDiscriminatorAt({3})
    module = TokenizerModule(tiny_vqgan(), NaNGradientAt(set()), gan)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, DataLoader(TensorDataset(images, torch.zeros(8, dtype=torch.long)), batch_size=2))
    assert int(module.nonfinite_skipped) == 1
    after = gan.discriminator.state_dict()  # the last step was the bad one: the discriminator is as before it
    assert all(torch.equal(after[k], v) for k, v in gan.before_bad.items())
    assert non_finite_tensors(dict(module.state_dict())) == []


class NaNOnOneRank(torch.utils.data.Dataset):
    """16 random images; rank ``rank``'s ``call``-th read (batch size 1, no workers: its step
    ``call - 1``) is NaN, whichever indices the distributed sampler gives it. Only that rank
    meets a non-finite loss; the others must skip the step with it."""

    def __init__(self, rank: int = 1, call: int = 3):
        self.images, self.rank, self.call, self.calls = torch.rand(16, 3, 16, 16) * 2 - 1, rank, call, 0

    def __len__(self):
        return 16

    def __getitem__(self, i):
        import torch.distributed as dist

        self.calls += 1
        bad = dist.is_initialized() and dist.get_rank() == self.rank and self.calls == self.call
        return (torch.full_like(self.images[i], float("nan")) if bad else self.images[i]), 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_under_ddp_a_non_finite_loss_on_one_rank_makes_every_rank_skip_that_step(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from inprocess import tiny_module

    module = tiny_module()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn_find_unused_parameters_true", max_steps=4,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(NaNOnOneRank(), batch_size=1))  # a rank skipping alone would hang or desync
    # rank 0's state (ddp_spawn copies it back): it skipped rank 1's bad step too, and only that one
    assert int(module.nonfinite_skipped) == 1 and int(module.ema.num_updates) == 3
    assert non_finite_tensors(dict(module.state_dict())) == []
