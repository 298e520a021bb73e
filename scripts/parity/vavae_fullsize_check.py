"""The check outside the project for VA-VAE: the FULL-size released f16d32 architecture.

1. Runs ``vavae_reference.py --size full`` with the reference's Python: LightningDiT's own
   ``AutoencoderKL(embed_dim=32, ch_mult=(1, 1, 2, 2, 4))`` with random weights, saved as the
   released file is laid out (Lightning ``state_dict``, ``linear_proj``, ``loss.*``), plus its
   posterior and decoded images for two random 256 px images.
2. Loads that file with ``load_pretrained("vavae_f16d32", ...)`` here and compares:
   posterior mean and log-variance (tolerance 1e-4), decoded images (1e-3), fp32 CPU.

    python scripts/parity/vavae_fullsize_check.py --lightningdit /path/LightningDiT \\
        --workdir /tmp/vavae_full [--ref-python /path/ref-venv/bin/python]

Run from the tokbench repository root with the project's Python. Exit status 0 when every
difference is within tolerance. Takes a few minutes on CPU (two 256 px passes per side).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TOLERANCES = {"mean": 1e-4, "logvar": 1e-4, "decoded_mean": 1e-3, "decoded_latents": 1e-3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lightningdit", type=Path, required=True, help="local clone of hustvl/LightningDiT")
    parser.add_argument("--workdir", type=Path, required=True, help="where the full-size file and outputs go")
    parser.add_argument("--ref-python", default=sys.executable, help="Python that runs the reference code")
    parser.add_argument("--reuse", action="store_true", help="skip step 1 when its files exist")
    args = parser.parse_args()

    release, outputs = args.workdir / "vavae_full_release.pt", args.workdir / "vavae_full_outputs.pt"
    if not (args.reuse and release.exists() and outputs.exists()):
        t0 = time.time()
        subprocess.run([args.ref_python, str(Path(__file__).with_name("vavae_reference.py")), "--lightningdit",
                        str(args.lightningdit), "--size", "full", "--out", str(args.workdir)], check=True)
        print(f"reference: {time.time() - t0:.0f} s")

    from tokenizers.pretrained import load_pretrained

    torch.set_grad_enabled(False)
    t0 = time.time()
    model = load_pretrained("vavae_f16d32", release)  # the released defaults: nothing passed
    ref = torch.load(outputs, weights_only=True)
    posterior = model.posterior(ref["images"])
    ours = {
        "mean": posterior.mean,
        "logvar": posterior.logvar,
        "decoded_mean": model.decode_latents(posterior.mode()),
        "decoded_latents": model.decode_latents(ref["latents"]),
    }
    print(f"tokbench: {time.time() - t0:.0f} s; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"ignored {model.ignored_keys}")
    print(f"images {tuple(ref['images'].shape)}, latents {tuple(posterior.mean.shape)}, "
          f"log-variance clamped at {ref['clamped_fraction']:.0%} of elements")
    ok = True
    for key, tol in TOLERANCES.items():
        diff = (ours[key] - ref[key]).abs().max().item()
        scale = ref[key].abs().max().item()
        passed = diff <= tol
        ok &= passed
        print(f"{key:16s} max abs diff {diff:.3e} (tolerance {tol:g}; reference max abs {scale:.3g}) "
              f"{'ok' if passed else 'FAIL'}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
