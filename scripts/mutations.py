"""Break the code on purpose, one change at a time, and report which tests notice.

    python scripts/mutations.py                    # every mutation, its own test selection
    python scripts/mutations.py --only ema_not_restored,ssim_ones
    python scripts/mutations.py --list
    python scripts/mutations.py --check            # only report mutations whose text has moved
    python scripts/mutations.py --tests tests      # run the whole fast suite for each one

Each mutation replaces one exact piece of source text (it must occur exactly once) in a
copy of the working tree under a temporary directory; the tests run there, the file is
put back, and the next mutation follows. A mutation whose text no longer exists is
reported as ``stale`` (the code moved: update its text here). The result table goes to
stdout and, with ``--out``, to a JSON file. Nothing in the repository is modified.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "logs", "outputs", "__pycache__", "*.egg-info",
                                ".pytest_cache", "wandb")


@dataclass
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: list[str] = field(default_factory=list)


E = "tests/test_effects_eval.py"
L = "tests/test_effects_losses.py"
P = "tests/test_effects_loop.py"
D = "tests/test_effects_data.py"
R = "tests/test_resume_state.py"

MUTATIONS = [
    # -- the nine behaviours of issue 14 ------------------------------------------------------
    Mutation("ema_not_restored", "EMA copy re-made from the raw weights when training starts (a resume loses it)",
             "training/module.py", "    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:\n",
             "    def on_train_start(self) -> None:\n"
             "        if self.ema is not None:\n"
             "            self.ema.module.load_state_dict(self.tokenizer.state_dict())\n\n"
             "    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:\n", [R]),
    Mutation("ema_outside_module_tree", "EMA held outside the module tree: never saved, never restored",
             "training/module.py", "        self.ema = EMA(tokenizer, ema_decay) if ema_decay else None",
             "        object.__setattr__(self, 'ema', EMA(tokenizer, ema_decay) if ema_decay else None)", [R]),
    Mutation("disc_optimizer_not_restored", "discriminator optimizer state dropped from the checkpoint",
             "training/module.py", "        if self.run_config is not None:\n            checkpoint[\"config\"] = self.run_config\n",
             "        if self.run_config is not None:\n            checkpoint[\"config\"] = self.run_config\n"
             "        if len(checkpoint.get(\"optimizer_states\", [])) > 1:\n"
             "            checkpoint[\"optimizer_states\"][1][\"state\"] = {}\n", [R]),
    Mutation("ranks_read_every_shard", "every rank resamples every shard; the log line still lists its own",
             "data/webdataset_module.py", "wds.ResampledShards(urls, seed=shard_seed",
             "wds.ResampledShards(self._train_urls, seed=shard_seed", [D]),
    Mutation("nested_dropout_off", "FlexTok keeps every register in training forward",
             "tokenizers/flextok.py",
             "            keep = sample_keep_counts(b, self.num_registers, self.nested_dropout, device=device)",
             "            keep = torch.full((b,), self.num_registers, dtype=torch.long, device=device)", [L]),
    Mutation("vavae_margins_ignored", "VA-VAE's margins from the config not passed to the loss terms",
             "tokenizers/vae.py", "        l_mcos = marginal_cosine_loss(projected, features, self.cos_margin)\n"
             "        l_mdms = marginal_distance_matrix_loss(projected, features, self.distmat_margin)",
             "        l_mcos = marginal_cosine_loss(projected, features)\n"
             "        l_mdms = marginal_distance_matrix_loss(projected, features)", [L]),
    Mutation("disentanglement_detached", "FQGAN disentanglement loss with the right value and no gradient",
             "tokenizers/fqgan.py", 'losses["disentanglement"] = self.disentangle_weight * disentangle',
             'losses["disentanglement"] = self.disentangle_weight * disentangle.detach()', [L]),
    Mutation("psnr_wrong_scale", "evaluator PSNR on [-1, 1] floats with the 8-bit data range",
             "evaluation/runner.py", "row.psnr.update(psnr_per_image(prediction, targets))",
             "row.psnr.update(psnr_per_image(reconstruction, images))", [E]),
    Mutation("psnr_not_rounded", "pixels not rounded to 8-bit levels before PSNR / SSIM",
             "common/metrics.py", "    return ((images.detach().double().clamp(-1, 1) + 1) * 127.5).round()",
             "    return ((images.detach().double().clamp(-1, 1) + 1) * 127.5)", [E]),
    Mutation("ssim_ones", "SSIM returns ones", "common/metrics.py",
             "    return structural_similarity_index_measure(\n        prediction.double(), target.double(), data_range=data_range, reduction=\"none\"\n    )",
             "    return torch.ones(prediction.shape[0], dtype=torch.float64)", [E]),
    Mutation("validation_raw_weights", "validation uses the raw weights instead of the EMA copy",
             "training/module.py", "        model = self.eval_tokenizer\n", "        model = self.tokenizer\n", [E]),
    Mutation("validation_counts_padding", "validation scores the padding rows too", "training/module.py",
             "        if len(batch) > 1 and (batch[1] < 0).any():", "        if False:", [E]),
    Mutation("grid_raw_weights", "image grids drawn with the raw weights", "training/callbacks.py",
             "        model = pl_module.eval_tokenizer\n", "        model = pl_module.tokenizer\n", [E]),
    Mutation("ckpt_path_ignored", "train() resolves ckpt_path but fits from scratch",
             "training/run.py", "trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)",
             "trainer.fit(module, datamodule=datamodule, ckpt_path=None)", [R]),
    # -- resume, ids ------------------------------------------------------------------------------
    Mutation("resume_auto_ignored", "re-running in the same run directory starts over",
             "training/checkpoints.py", "        if last.is_file():\n            log.info(\"Resuming from",
             "        if False:\n            log.info(\"Resuming from", [R]),
    Mutation("wandb_id_not_kept", "a new W&B run id on every start", "common/loggers.py",
             "    if path.is_file():\n        return path.read_text().strip()\n", "", [R]),
    # -- quantizers -------------------------------------------------------------------------------
    Mutation("no_straight_through", "VQ output is the code itself: no gradient to the encoder",
             "tokenizers/quantizers.py", "        q_st = z_flat + (q_flat - z_flat).detach()", "        q_st = q_flat",
             [L, "tests/test_quantizer.py"]),
    Mutation("beta_on_codebook", "beta weights the codebook term instead of the commitment term",
             "tokenizers/quantizers.py",
             '            "codebook": F.mse_loss(q_flat, z_flat.detach()),\n            "commitment": self.beta * F.mse_loss(z_flat, q_flat.detach()),',
             '            "codebook": self.beta * F.mse_loss(q_flat, z_flat.detach()),\n            "commitment": F.mse_loss(z_flat, q_flat.detach()),',
             [L, "tests/test_quantizer.py"]),
    Mutation("commitment_moves_codes", "commitment term not detached from the codes",
             "tokenizers/quantizers.py", '"commitment": self.beta * F.mse_loss(z_flat, q_flat.detach()),',
             '"commitment": self.beta * F.mse_loss(z_flat, q_flat),', [L, "tests/test_quantizer.py"]),
    Mutation("no_l2_norm", "l2 normalisation of the latents skipped", "tokenizers/quantizers.py",
             "        return F.normalize(z_flat, dim=-1) if self.l2_normalize else z_flat", "        return z_flat",
             [L, "tests/test_quantizer.py"]),
    Mutation("fsq_no_rounding", "FSQ does not round", "tokenizers/fsq.py",
             "    return x + (x.round() - x).detach()", "    return x", ["tests/test_flextok.py"]),
    # -- loop -------------------------------------------------------------------------------------
    Mutation("adaptive_weight_unclamped", "adaptive weight not clamped to max_weight", "training/module.py",
             ".clamp(0.0, max_weight).detach()", ".clamp(min=0.0).detach()", [L, "tests/test_module.py", "tests/test_vae.py"]),
    Mutation("ema_decay_ignored", "EMA warm-up only, the configured decay ignored", "common/ema.py",
             "        d = min(self.decay, (1 + n) / (10 + n))", "        d = (1 + n) / (10 + n)", [P]),
    Mutation("ema_not_updated", "EMA never updated after a step", "training/module.py",
             "            self.ema.update(self.tokenizer)\n", "            pass\n", [P, E, "tests/test_module.py"]),
    Mutation("lr_not_from_config", "tokenizer optimizer built with a fixed learning rate", "training/module.py",
             "        opt_g = self.optimizer_factory(params)", "        opt_g = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.95))",
             [P]),
    Mutation("disc_optimizer_is_tokenizer_optimizer", "disc_optimizer config ignored", "training/module.py",
             "        self.disc_optimizer_factory = disc_optimizer or optimizer",
             "        self.disc_optimizer_factory = optimizer", [P]),
    Mutation("no_grad_clip", "tokenizer gradients not clipped", "training/module.py",
             "                self._clip(opt_g, self.grad_clip)\n", "                pass\n", [P]),
    Mutation("disc_start_ignored", "GAN terms active from step 0", "tokenizers/gan.py",
             "        return step >= self.disc_start", "        return True", [P, L, "tests/test_module.py"]),
    Mutation("hinge_fake_sign", "hinge discriminator loss with the wrong sign on fakes", "tokenizers/gan.py",
             "F.relu(1.0 + logits_fake).mean()", "F.relu(1.0 - logits_fake).mean()", [L]),
    Mutation("r2_dropped", "R3GAN penalty without R2", "tokenizers/r3gan.py",
             "        loss = adversarial + 0.5 * gamma * (r1 + r2)", "        loss = adversarial + 0.5 * gamma * r1",
             ["tests/test_r3gan.py"]),
    Mutation("kl_weight_ignored", "KL term without its weight", "tokenizers/vae.py",
             '        return {"kl": self.kl_weight * kl}, logs', '        return {"kl": kl}, logs', ["tests/test_vae.py"]),
    Mutation("semantic_temperature_ignored", "FQGAN InfoNCE at temperature 1 whatever the config", "tokenizers/fqgan.py",
             "branch.head(z_q), target, self.semantic_temperature, self.gather_negatives",
             "branch.head(z_q), target, 1.0, self.gather_negatives", [L]),
    Mutation("repa_detached", "REPA features detached from the decoder", "tokenizers/flextok.py",
             "repa_alignment(self.repa_projector(features), target)",
             "repa_alignment(self.repa_projector(features.detach()), target)", [L]),
    Mutation("pixel_distance_ignored", "loss.pixel=l1 still trains with MSE", "tokenizers/losses.py",
             '        dist = F.l1_loss if self.pixel == "l1" else F.mse_loss', "        dist = F.mse_loss", [L]),
    Mutation("perceptual_weight_ignored", "LPIPS term without its weight", "tokenizers/losses.py",
             '            terms["perceptual"] = self.perceptual_weight * self.perceptual(recon, target).mean()',
             '            terms["perceptual"] = self.perceptual(recon, target).mean()', [L]),
    Mutation("gan_weight_ignored", "constant GAN weight (disc_weight) not applied", "training/module.py",
             '                losses["gan"] = self.gan.disc_weight * g', '                losses["gan"] = g', [L]),
    # -- data -------------------------------------------------------------------------------------
    Mutation("no_flip", "training transform never flips", "data/transforms.py",
             "        if self.flip and random.random() < 0.5:", "        if False:", [D]),
    Mutation("resize_not_crop", "training transform squashes instead of cropping", "data/transforms.py",
             "        image = resized_window(image, new_size, left, top, size)",
             "        image = image.resize((size, size))", [D]),
    Mutation("val_workers_read_everything", "every validation worker reads every segment", "data/webdataset_module.py",
             "            Segments(segments),\n            wds.split_by_worker,\n", "            Segments(segments),\n",
             ["tests/test_data.py"]),
    # -- evaluator --------------------------------------------------------------------------------
    Mutation("meter_not_reduced", "per-image means not summed across ranks", "common/metrics.py",
             "        packed = all_reduce_sum(torch.stack([self.total, self.count]).to(dev)).cpu()",
             "        packed = torch.stack([self.total, self.count])", ["tests/test_evaluate.py"]),
    Mutation("usage_overwritten", "code counts overwritten by each batch instead of accumulated", "common/metrics.py",
             "            counts += torch.bincount(flat, minlength=k).cpu()",
             "            counts.copy_(torch.bincount(flat, minlength=k).cpu())", ["tests/test_metrics.py", E]),
    # -- resume logging, speed switches ------------------------------------------------------------
    Mutation("logged_step_shift_on_resume", "the final checkpoint's logging counter taken as Lightning assumes it",
             "training/run.py", "        callbacks = [*_instantiate_all(cfg.get(\"callbacks\")), LoggedStepAfterResume(), validated]",
             "        callbacks = [*_instantiate_all(cfg.get(\"callbacks\")), validated]", ["tests/test_faults_resume.py"]),
    Mutation("lr_schedule_ignored", "module.lr_schedule accepted but the optimizers keep the configured rate",
             "training/module.py", "        if self.lr_schedule is not None:\n            self._schedule_lr(step, opt_g, opt_d)",
             "        pass", ["tests/test_schedules.py"]),
    Mutation("final_weights_not_validated", "a run ending between validations reports an older step's metrics",
             "training/run.py", "        validate_final_weights(trainer, module, datamodule, validated)\n", "",
             ["tests/test_schedules.py"]),
    Mutation("norm_act_not_recomputed", "recompute_norm_act accepted but GroupNorm + SiLU outputs still kept",
             "tokenizers/conv.py", "        return _NormSiLUConv.apply(x, norm.weight, norm.bias, conv.weight, conv.bias, norm, conv)",
             "        return conv(F.silu(norm(x)))", ["tests/test_acceleration.py"]),
    Mutation("recomputed_conv_weight_grad_dropped", "the fused norm-act-conv returns no gradient for the conv weight",
             "tokenizers/conv.py", "        return (gx, gnw, gnb, None if grad_w is None else grad_w.to(conv_weight.dtype),",
             "        return (gx, gnw, gnb, None,", ["tests/test_acceleration.py"]),
]


def copy_tree(dst: Path) -> Path:
    shutil.copytree(ROOT, dst, ignore=IGNORE, symlinks=True)
    return dst


def run_tests(cwd: Path, tests: list[str], timeout: int) -> tuple[int, list[str], float, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--no-header", "-p", "no:cacheprovider",
           "-o", "addopts=-m 'not slow and not slurm and not gpu'", *tests]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return -1, ["<timeout>"], time.time() - start, ""
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)))
    return proc.returncode, failed, time.time() - start, proc.stdout[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutation names")
    parser.add_argument("--tests", nargs="*", help="run these tests for every mutation instead of its own selection")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--check", action="store_true", help="report stale mutations (text moved) and exit")
    parser.add_argument("--baseline", action="store_true", help="first check that the selections pass unmutated")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.check:
        stale = [m.name for m in chosen
                 if not (ROOT / m.file).is_file() or (ROOT / m.file).read_text().count(m.old) != 1]
        print("stale: " + (", ".join(stale) if stale else "none") + f" ({len(chosen)} checked)")
        return 1 if stale else 0
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file:30s} {m.what}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="tokbench-mutations-") as tmp:
        work = copy_tree(Path(tmp) / "repo")
        if args.baseline:
            selection = args.tests or sorted({t for m in chosen for t in m.tests})
            code, failed, seconds, tail = run_tests(work, selection, args.timeout)
            print(f"baseline: {'pass' if code == 0 else 'FAIL ' + ', '.join(failed)} ({seconds:.0f} s)", flush=True)
            if code != 0:
                print(tail)
                return 1
        for m in chosen:
            path = work / m.file
            if not path.is_file():
                results.append({"name": m.name, "status": "stale", "why": f"{m.file} is gone"})
                print(f"{m.name}: STALE ({m.file} is gone)", flush=True)
                continue
            original = path.read_text()
            if original.count(m.old) != 1:
                results.append({"name": m.name, "status": "stale", "why": f"text found {original.count(m.old)} times"})
                print(f"{m.name}: STALE (text found {original.count(m.old)} times in {m.file})", flush=True)
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                code, failed, seconds, tail = run_tests(work, args.tests or m.tests, args.timeout)
            finally:
                path.write_text(original)
            status = "caught" if failed else ("error" if code not in (0, 5) else "NOT CAUGHT")
            results.append({"name": m.name, "what": m.what, "file": m.file, "status": status, "caught_by": failed,
                            "seconds": round(seconds, 1)})
            shown = ", ".join(f.split("::", 1)[-1] for f in failed[:4]) + (" ..." if len(failed) > 4 else "")
            print(f"{m.name}: {status} ({seconds:.0f} s) {shown}", flush=True)
            if status == "error":
                print(tail)

    print("\n| mutation | what | caught by |\n|---|---|---|")
    for r in results:
        caught = "; ".join(r.get("caught_by", [])) or r["status"]
        print(f"| {r['name']} | {r.get('what', r.get('why', ''))} | {caught} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"] == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
