"""Claims about the latent-generator pipeline for gFID (training/generator_module.py,
evaluation/generation.py): encode once, train, sample, gFID."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from evaluation.generation import sample_noise
from training.generator_module import (
    LatentDataModule,
    NormalisedLatents,
    channel_statistics,
    fit_generator,
    load_generator,
)

ROOT = Path(__file__).resolve().parents[1]

TINY_VQGAN = {
    "_target_": "tokenizers.vqgan.VQGAN",
    "encoder": {"_target_": "tokenizers.conv.Encoder", "width": 16, "mults": [1, 2, 2], "num_res_blocks": 1,
                "z_channels": 8},
    "decoder": {"_target_": "tokenizers.conv.Decoder", "width": 16, "mults": [1, 2, 2], "num_res_blocks": 1,
                "z_channels": 8},
    "quantizer": {"_target_": "tokenizers.quantizers.VectorQuantizer", "codebook_size": 32, "code_dim": 4},
}


def tiny_tokenizer_checkpoint(path: Path) -> Path:
    """A checkpoint in the training loop's format (saved config + ``tokenizer.*`` weights),
    built without training: the pipeline only needs a frozen tokenizer."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    tokenizer = instantiate(TINY_VQGAN)
    state = {f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()}
    torch.save({"config": {"tokenizer": TINY_VQGAN, "run_name": "tiny_vq"}, "state_dict": state}, path)
    return path


def synthetic_data(**kw):
    from data.synthetic import SyntheticDataModule

    return SyntheticDataModule(resolution=16, batch_size=4, num_train=10, num_val=4, val_remainder="pad", **kw)


def test_channel_statistics_are_the_per_channel_mean_and_std_of_all_positions():
    x = torch.randn(6, 3, 4, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.0, 3.0, -1.0]).view(1, 3, 1, 1)
    mean, std, n = channel_statistics(x, torch.device("cpu"))
    flat = x.permute(1, 0, 2, 3).reshape(3, -1).double()
    assert n == 6 * 4 * 5
    assert torch.allclose(mean.double(), flat.mean(1), atol=1e-6)
    assert torch.allclose(std.double(), flat.std(1, unbiased=False), atol=1e-5)


def test_training_latents_are_encoded_once_cached_and_normalised(tmp_path):
    ckpt = tiny_tokenizer_checkpoint(tmp_path / "tok.ckpt")
    dm = LatentDataModule(synthetic_data(), str(ckpt), str(tmp_path / "cache"), batch_size=2, cache_dtype="float32")
    dm.setup("fit")
    assert dm.latents.shape == (10, 4, 4, 4)  # every training image once, latent_shape of the tokenizer
    shard = next(dm.cache_dir.glob("rank*.pt"))
    written = shard.stat().st_mtime_ns
    again = LatentDataModule(synthetic_data(), str(ckpt), str(tmp_path / "cache"), batch_size=2, cache_dtype="float32")
    again.setup("fit")
    assert shard.stat().st_mtime_ns == written  # reused, not re-encoded
    data = NormalisedLatents(again.latents, again.labels, again.mean, again.std)
    x = torch.stack([data[i][0] for i in range(len(data))])
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3)


def test_sample_noise_does_not_depend_on_batching():
    both = sample_noise([3, 5], (2, 4, 4), seed=7)
    assert torch.equal(both[0], sample_noise([3], (2, 4, 4), seed=7)[0])
    assert torch.equal(both[1], sample_noise([5], (2, 4, 4), seed=7)[0])
    assert not torch.equal(both[0], both[1])


def test_generator_pipeline_encode_train_sample_gfid_runs_end_to_end_under_smoke(tmp_path, monkeypatch):
    from evaluation.main import evaluate

    monkeypatch.chdir(ROOT)  # evaluate.yaml finds the shared config groups relative to the repository root

    ckpt = tiny_tokenizer_checkpoint(tmp_path / "tok.ckpt")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train_cfg = compose("train", overrides=[
            "experiment=generator", "debug=smoke", "data=synthetic", "data.resolution=16", "data.num_train=12",
            f"generator.tokenizer_ckpt={ckpt}", f"paths.output_dir={tmp_path / 'gen'}",
            f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2", "logger=none",
        ])
    assert train_cfg.task == "generator" and train_cfg.generator.model.hidden == 32  # the smoke size
    fit_generator(train_cfg)
    gen_ckpt = tmp_path / "gen" / "checkpoints" / "last.ckpt"
    module, saved = load_generator(gen_ckpt)
    assert module.facts["latent_channels"] == 4 and module.facts["num_classes"] == 4
    assert module.facts["global_step"] == 2
    assert not torch.equal(module.latent_std, torch.ones(4))  # statistics of the data, not the defaults

    with initialize_config_dir(config_dir=str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[
            "debug=smoke", "data.resolution=16", f"generators=[{tmp_path / 'gen'}]", f"out={tmp_path / 'report'}",
            f"paths.output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}",
            "generation.num_samples=6", "generation.batch_size=4", "generation.steps=2",
        ])
    results = evaluate(eval_cfg)
    (result,) = results  # the generator's tokenizer was added to the evaluated checkpoints
    assert result["checkpoint"] == str(ckpt.resolve())
    generation = json.loads((tmp_path / "report" / "tiny_vq.json").read_text())["generation"]
    assert generation["num_samples"] == 6 and torch.isfinite(torch.tensor(generation["gfid"]))
    assert "gFID" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "generated_samples.png").stat().st_size > 1000
    assert list((tmp_path / "cache" / "fid_reference").glob("*.pt"))  # reference statistics cached
