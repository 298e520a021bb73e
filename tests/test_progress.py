"""The run's progress: one bar over all steps, a measured estimate, validation results shown."""
import logging
import time

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.progress import RunProgressBar, RunSummary


class _Tiny(pl.LightningModule):
    def __init__(self, slow_validation: float = 0.0):
        super().__init__()
        self.model = nn.Linear(4, 1)
        self.slow_validation = slow_validation

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        if self.global_step == 3:
            time.sleep(self.slow_validation)  # a slow validation inside the measured steps
        self.log("val/psnr", 12.5 + batch_idx * 0.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, callbacks, max_steps=14, ckpt_path=None, slow_validation=0.0):
    data = DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=4)  # 3 batches per epoch
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                         callbacks=callbacks, val_check_interval=3, check_val_every_n_epoch=None,
                         limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
                         default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(_Tiny(slow_validation), train_dataloaders=data, val_dataloaders=data, ckpt_path=ckpt_path)
    return trainer


def test_one_bar_counts_all_steps_across_epochs(tmp_path):
    bar = RunProgressBar(refresh_rate=1)
    _fit(tmp_path, [bar], max_steps=14)
    assert bar.train_progress_bar.total == 14  # not the 3 batches of an epoch
    assert bar.train_progress_bar.n == 14


def test_resumed_bar_starts_at_the_saved_step(tmp_path):
    trainer = _fit(tmp_path, [RunProgressBar(refresh_rate=1)], max_steps=6)
    trainer.save_checkpoint(tmp_path / "six.ckpt")
    bar = RunProgressBar(refresh_rate=1)
    _fit(tmp_path, [bar], max_steps=9, ckpt_path=tmp_path / "six.ckpt")
    assert bar.train_progress_bar.initial == 6 and bar.train_progress_bar.n == 9


def test_summary_measures_the_step_time_and_shows_validation(tmp_path, caplog):
    summary = RunSummary(measure_steps=4, skip=1)
    with caplog.at_level(logging.INFO, logger="training.progress"):
        _fit(tmp_path, [summary], max_steps=14, slow_validation=0.8)
    # the 0.8 s validation at step 3 is not a training step (counted, it would add 0.2 s to each of the 4)
    assert 0 < summary.seconds_per_step < 0.15
    assert summary.estimated_seconds == summary.seconds_per_step * (14 - 5)
    assert [v["step"] for v in summary.validations] == [3, 6, 9, 12]
    assert "Training Linear" in caplog.text and "Validation at step 3: psnr 12.5 dB" in caplog.text
