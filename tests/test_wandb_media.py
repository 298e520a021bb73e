"""What W&B shows is what the run wrote locally, and the W&B run closes cleanly."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from training.callbacks import ReconstructionGrid
from common.loggers import finish_loggers, wandb_logger


class _Reconstructs(nn.Module):
    """Stands in for a LightningModule: ``eval_tokenizer`` returns a fixed transform."""

    def __init__(self):
        super().__init__()
        self.eval_tokenizer = lambda x: SimpleNamespace(reconstruction=x.flip(-1) * 0.5)


@pytest.mark.slow  # W&B's service takes 5-25 s to start here
def test_wandb_media_equal_the_local_grid_and_the_debug_log_has_no_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = wandb_logger(save_dir=str(tmp_path), project="test", name="media")
    trainer = SimpleNamespace(global_step=7, loggers=[logger])
    grid = ReconstructionGrid(dirpath=str(tmp_path / "images"), num_images=3)
    images = torch.linspace(-1, 1, 3 * 3 * 16 * 16).reshape(3, 3, 16, 16)
    grid._save(trainer, _Reconstructs(), images, "val")
    finish_loggers([logger])
    import wandb

    assert wandb.run is None  # finished now, not abandoned at interpreter exit (HandleAbandonedError)

    local = np.asarray(Image.open(tmp_path / "images" / "val_step0000007.png").convert("RGB"))
    (media,) = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/**/val_*.png"))
    logged = np.asarray(Image.open(media).convert("RGB"))
    assert local.max() > 200  # a real image, not the black [0, 1] -> uint8 cast
    np.testing.assert_array_equal(logged, local)
    for log in (tmp_path / "wandb").glob("offline-run-*/logs/debug*.log"):
        text = log.read_text()
        assert " ERROR " not in text and "Traceback" not in text, f"{log.name}:\n{text[-2000:]}"
