"""Claims about the generator pipeline (training/generator_cache.py, training/generator_module.py,
diffusion/samplers.py, evaluation/generation.py): encode once (resumably), pick the family
from the tokenizer's facts, train, sample, gFID."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.samplers import choose_family, contract_tokens, load_generator, per_sample_randn, tokenizer_facts
from training.generator_cache import TokenCache, channel_statistics, token_sequence
from training.generator_module import fit_generator

ROOT = Path(__file__).resolve().parents[1]

TINY_VQGAN = {
    "_target_": "tokenizers.vqgan.VQGAN",
    "encoder": {"_target_": "tokenizers.conv.Encoder", "width": 16, "mults": [1, 2, 2], "num_res_blocks": 1,
                "z_channels": 8},
    "decoder": {"_target_": "tokenizers.conv.Decoder", "width": 16, "mults": [1, 2, 2], "num_res_blocks": 1,
                "z_channels": 8},
    "quantizer": {"_target_": "tokenizers.quantizers.VectorQuantizer", "codebook_size": 32, "code_dim": 4},
}
FAMILY_OF = {"vqgan": "raster_ar", "fqgan_dual": "factorized_ar", "fqgan_triple": "factorized_ar",
             "vae": "latent_dit", "vavae": "latent_dit", "flextok": "sequence_ar"}


def save_tokenizer(tokenizer, config: dict, path: Path) -> Path:
    """A checkpoint in the training loop's format (saved config + ``tokenizer.*`` weights),
    built without training: the pipeline only needs a frozen tokenizer."""
    state = {f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()}
    torch.save({"config": config, "state_dict": state}, path)
    return path


def tiny_tokenizer_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    return save_tokenizer(instantiate(TINY_VQGAN), {"tokenizer": TINY_VQGAN, "run_name": "tiny_vq"}, path)


def smoke_tokenizer_checkpoint(name: str, path: Path) -> Path:
    """The ``debug=smoke`` size of tokenizer ``name`` (random weights, random teachers)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"tokenizer={name}", "debug=smoke", "data=synthetic"])
    tok_cfg = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    torch.manual_seed(0)
    tokenizer = instantiate(tok_cfg).eval()
    with torch.no_grad():  # a trained tokenizer has seen data (FlexTok measures its latent scale on it)
        tokenizer.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    return save_tokenizer(tokenizer, {"tokenizer": tok_cfg, "run_name": name}, path)


def synthetic_data(resolution=16, **kw):
    from data.synthetic import SyntheticDataModule

    return SyntheticDataModule(resolution=resolution, batch_size=4, num_train=10, num_val=4, val_remainder="pad", **kw)


def test_channel_statistics_are_the_per_channel_mean_and_std_of_all_positions():
    x = torch.randn(6, 3, 4, 5) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.0, 3.0, -1.0]).view(1, 3, 1, 1)
    mean, std, n = channel_statistics(x, torch.device("cpu"))
    flat = x.permute(1, 0, 2, 3).reshape(3, -1).double()
    assert n == 6 * 4 * 5
    assert torch.allclose(mean.double(), flat.mean(1), atol=1e-6)
    assert torch.allclose(std.double(), flat.std(1, unbiased=False), atol=1e-5)


def test_token_layout_round_trips_every_encode_format():
    one_map = torch.randint(10, (2, 3, 4))
    seq = token_sequence(one_map)
    assert seq.shape == (2, 1, 12) and torch.equal(seq[0, 0, 4], one_map[0, 1, 0])  # raster order
    assert torch.equal(contract_tokens(seq, (3, 4)), one_map)
    maps = (torch.randint(10, (2, 3, 4)), torch.randint(10, (2, 3, 4)), torch.randint(10, (2, 3, 4)))
    seq = token_sequence(maps)
    assert seq.shape == (2, 3, 12) and torch.equal(seq[:, 1], maps[1].flatten(1))  # codebook order kept
    assert all(torch.equal(a, b) for a, b in zip(contract_tokens(seq, (3, 4)), maps))
    registers = torch.randint(10, (2, 16))
    assert torch.equal(contract_tokens(token_sequence(registers)[:, :, :5], (16,)), registers[:, :5])


def test_token_cache_holds_every_image_once_and_resumes_after_an_interruption(tmp_path):
    ckpt = tiny_tokenizer_checkpoint(tmp_path / "tok.ckpt")
    kw = dict(batch_size=2, discrete=True, vocab_sizes=(32,), chunk_batches=1)
    dm = TokenCache(synthetic_data(), str(ckpt), str(tmp_path / "cache"), **kw)
    dm.setup("fit")
    data = dm.dataset()
    assert len(data) == 10 and dm.encoded_batches == 3  # 10 images, batches of 4
    from data.splits import labelled, training_split_once
    from tokenizers.loading import load_tokenizer

    tokenizer, _ = load_tokenizer(str(ckpt))
    images, labels = zip(*labelled(training_split_once(synthetic_data())))
    expected = tokenizer.encode(torch.cat(images)).flatten(1)
    tokens = torch.stack([data[i][0] for i in range(len(data))])
    assert tokens.shape == (10, 1, 16) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, 0], expected)  # the tokenizer's codes, in the split's order
    assert torch.equal(torch.stack([data[i][1] for i in range(len(data))]), torch.cat(labels))
    # an interrupted job: one chunk and the completion markers missing -> only that chunk is encoded again
    folder = dm.cache_dir
    (folder / "stats.pt").unlink()
    rank_dir = next(folder.glob("rank0-of-1"))
    (rank_dir / "done").unlink()
    second = rank_dir / "chunk000001.pt"
    before = torch.load(second, weights_only=True)["values"]
    second.unlink()
    again = TokenCache(synthetic_data(), str(ckpt), str(tmp_path / "cache"), **kw)
    again.setup("fit")
    assert again.encoded_batches == 1
    assert torch.equal(torch.load(second, weights_only=True)["values"], before)
    reuse = TokenCache(synthetic_data(), str(ckpt), str(tmp_path / "cache"), **kw)
    reuse.setup("fit")
    assert reuse.encoded_batches == 0 and len(reuse.dataset()) == 10


def test_latent_cache_is_normalised_per_channel(tmp_path):
    ckpt = tiny_tokenizer_checkpoint(tmp_path / "tok.ckpt")
    dm = TokenCache(synthetic_data(), str(ckpt), str(tmp_path / "cache"), batch_size=2, discrete=False,
                    cache_dtype="float32")
    dm.setup("fit")
    data = dm.dataset()
    x = torch.stack([data[i][0] for i in range(len(data))])
    assert x.shape == (10, 4, 4, 4)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3)


def test_per_sample_noise_does_not_depend_on_batching():
    both = per_sample_randn([3, 5], (2, 4, 4), seed=7)
    assert torch.equal(both[0], per_sample_randn([3], (2, 4, 4), seed=7)[0])
    assert torch.equal(both[1], per_sample_randn([5], (2, 4, 4), seed=7)[0])
    assert not torch.equal(both[0], both[1])


@pytest.mark.parametrize("name", sorted(FAMILY_OF))
def test_family_follows_the_tokenizer_contract(name, tmp_path):
    from tokenizers.loading import load_tokenizer

    tokenizer, _ = load_tokenizer(str(smoke_tokenizer_checkpoint(name, tmp_path / "tok.ckpt")))
    assert choose_family(tokenizer_facts(tokenizer, 32)) == FAMILY_OF[name]


def run_pipeline(tmp_path: Path, tokenizer_ckpt: Path, resolution: int, extra: list[str] = ()):
    """train.py experiment=generator debug=smoke, then evaluate.py generators=[...] debug=smoke."""
    from evaluation.main import evaluate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train_cfg = compose("train", overrides=[
            "experiment=generator", "debug=smoke", "data=synthetic", f"data.resolution={resolution}",
            "data.num_train=12", f"generator.tokenizer_ckpt={tokenizer_ckpt}", f"paths.output_dir={tmp_path / 'gen'}",
            f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2", "logger=none", *extra,
        ])
    fit_generator(train_cfg)
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "evaluate"), version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[
            "debug=smoke", f"data.resolution={resolution}", f"generators=[{tmp_path / 'gen'}]",
            f"out={tmp_path / 'report'}", f"paths.output_dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}",
            "generation.num_samples=6", "generation.batch_size=4", "token_counts=[1,4,16]",
        ])
    return train_cfg, evaluate(eval_cfg)


def test_generator_pipeline_encode_train_sample_gfid_runs_end_to_end_under_smoke(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # evaluate.yaml finds the shared config groups relative to the repository root
    ckpt = tiny_tokenizer_checkpoint(tmp_path / "tok.ckpt")
    train_cfg, results = run_pipeline(tmp_path, ckpt, 16)
    assert train_cfg.generator.families.raster_ar.model.hidden == 32  # the smoke size
    module, _ = load_generator(tmp_path / "gen" / "checkpoints" / "last.ckpt")
    assert module.facts["family"] == "raster_ar" and module.facts["num_classes"] == 4
    assert module.facts["global_step"] == 2
    (result,) = results  # the generator's tokenizer was added to the evaluated checkpoints
    assert result["checkpoint"] == str(ckpt.resolve())
    generation = json.loads((tmp_path / "report" / "tiny_vq.json").read_text())["generation"]
    assert generation["num_samples"] == 6 and torch.isfinite(torch.tensor(generation["gfid"]))
    assert "cfg 2.0".lower() in generation["sampling"].lower()  # the paper's setting, saved with the generator
    assert "gFID" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "generated_samples.png").stat().st_size > 1000
    assert list((tmp_path / "cache" / "fid_reference").glob("*.pt"))  # reference statistics cached


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILY_OF))
def test_every_tokenizer_goes_through_cache_training_samples_and_gfid(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    ckpt = smoke_tokenizer_checkpoint(name, tmp_path / "tok.ckpt")
    _, results = run_pipeline(tmp_path, ckpt, 32)
    module, _ = load_generator(tmp_path / "gen" / "checkpoints" / "last.ckpt")
    assert module.facts["family"] == FAMILY_OF[name]
    generation = results[0]["generation"]
    assert generation["family"] == FAMILY_OF[name] and torch.isfinite(torch.tensor(generation["gfid"]))
    if name == "flextok":  # gFID per token count, and its plot
        assert sorted(generation["gfid_by_tokens"], key=int) == ["1", "4", "16"]
        assert (tmp_path / "report" / "gfid_tokens.png").is_file()


def test_cosine_term_is_per_position_along_channels():
    """LightningDiT's cosine loss compares velocity directions per latent position: a prediction
    that is the target scaled by a different positive factor at every position costs nothing."""
    from functools import partial

    from training.generator_module import LatentFlowModule

    torch.manual_seed(0)
    x0, scale = torch.randn(2, 3, 4, 4), torch.rand(2, 1, 4, 4) + 0.5

    class ScaledTarget(torch.nn.Module):
        in_channels = 3

        def forward(self, x_t, t, y):  # x_t = t eps + (1 - t) x0, so the target eps - x0 = (x_t - x0) / t
            return (x_t - x0) / t.view(-1, 1, 1, 1) * scale

    module = LatentFlowModule(ScaledTarget(), optimizer=partial(torch.optim.SGD, lr=0.1), cosine_weight=1.0)
    _, logs = module.loss((x0, torch.tensor([0, 1])))
    assert logs["cosine"] < 1e-5 and logs["mse"] > 1e-2


def test_sequence_training_counts_only_each_samples_kept_prefix(monkeypatch):
    """train_lengths (FlexTok's nested-dropout lengths): the loss of a sample with k kept
    tokens ignores its tokens from position k on, and counts every token before it."""
    from functools import partial

    from diffusion.ar import ClassConditionalAR
    from training.generator_module import TokenARModule

    torch.manual_seed(0)
    model = ClassConditionalAR((13,), (8,), num_classes=3, hidden=32, depth=1, heads=2, class_dropout=0.0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    module = TokenARModule(model, optimizer=partial(torch.optim.SGD, lr=0.1), train_lengths="pow2")
    monkeypatch.setattr("tokenizers.flextok.sample_keep_counts", lambda b, n, mode, device=None: torch.tensor([3, 5]))
    tokens, y = torch.randint(13, (2, 1, 8)), torch.tensor([0, 2])
    base = module.loss((tokens, y))[0]
    after = tokens.clone()
    after[0, :, 3:], after[1, :, 5:] = (after[0, :, 3:] + 1) % 13, (after[1, :, 5:] + 1) % 13
    assert torch.allclose(module.loss((after, y))[0], base, atol=1e-6)
    after[1, :, 4] = (after[1, :, 4] + 1) % 13
    assert not torch.allclose(module.loss((after, y))[0], base, atol=1e-4)


@pytest.mark.slow
def test_generator_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    ckpt = tiny_tokenizer_checkpoint(tmp_path / "tok.ckpt")

    def config(steps: int):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=[
                "experiment=generator", "debug=smoke", "data=synthetic", "data.resolution=16", "data.num_train=12",
                f"generator.tokenizer_ckpt={ckpt}", f"paths.output_dir={tmp_path / 'gen'}",
                f"paths.cache_dir={tmp_path / 'cache'}", f"trainer.max_steps={steps}", "logger=none"])

    from training.generator_module import TokenARModule

    fit_generator(config(2))
    steps_taken = []
    original = TokenARModule.loss
    monkeypatch.setattr(TokenARModule, "loss", lambda self, batch: steps_taken.append(1) or original(self, batch))
    fit_generator(config(4))  # resume=auto: the same run directory continues from step 2
    module, _ = load_generator(tmp_path / "gen" / "checkpoints" / "last.ckpt")
    assert len(steps_taken) == 2  # only the missing steps were trained
    assert module.facts["global_step"] == 4 and int(module.ema.num_updates) == 4
