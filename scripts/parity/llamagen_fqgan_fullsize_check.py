"""The check outside the project for LlamaGen VQ and FQGAN, at the released sizes.

For each release (``llamagen_vq16``, ``llamagen_vq8``, ``fqgan_{dual,triple}_ds{16,8}``) this
builds the FULL released architecture with the reference code (imported at run time from
local clones, see ``llamagen_fqgan_reference.py``), gives it seeded random weights in the
reference's own layout, saves them as the release is laid out (a training checkpoint dict
with the weights under ``model``), loads that file through ``load_pretrained`` exactly as a
user would, and compares on 256 px images:

- the continuous latents each quantizer receives (max abs difference),
- the token indices (fraction equal; the issue asks >= 99.9 %),
- images decoded from the reference's indices and ``decode(encode(x))`` (max abs, <= 1e-3),
- for FQGAN (loaded with ``heads=True``), the representation heads' class tokens.

Run (from the repository root, with the project's Python; needs ~3 GB of memory, and on two
busy CPU cores a few minutes per release):

    python scripts/parity/llamagen_fqgan_fullsize_check.py --llamagen /path/LlamaGen --fqgan /path/FQGAN \\
        [--only llamagen_vq16 ...] [--batch 2] [--json results.json]

Exit status 1 if any release misses a tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import llamagen_fqgan_reference as reference  # noqa: E402
from tokenizers.pretrained import load_pretrained, releases  # noqa: E402
from tokenizers.pretrained.synthetic import layout_of, seeded_state_dict  # noqa: E402

TOLERANCE = {"agreement": 0.999, "decode": 1e-3}


def project_latents(model, images):
    if hasattr(model, "branches"):
        trunk = model.encoder.trunk(images)
        return [b.quant_conv(b.adapter(trunk)) for b in model.branches.values()]
    return [model.quant_conv(model.encoder(images))]


@torch.no_grad()
def check(name: str, clones: dict, batch: int, seed: int, workdir: Path) -> dict:
    kind, variant, ds = reference.RELEASES[name]
    repo = "llamagen" if kind == "llamagen" else "fqgan"
    module = reference.import_reference(clones[repo], reference.REFERENCE_FILES[kind], f"_reference_{kind}")
    size = dict(reference.FULL, batch=batch)
    t0 = time.time()
    ref = reference.reference_model(module, kind, ds, size)
    state = seeded_state_dict(layout_of(ref.state_dict()), seed)
    ref.load_state_dict(state, strict=True)
    n_params = sum(v.numel() for k, v in state.items() if not k.endswith("codebook_used"))
    images = reference.as_input(reference.test_images(size, seed))
    expected = reference.run_reference(ref, kind, images)
    del ref
    path = workdir / releases()[name].files[0]
    torch.save({"model": state, "steps": 0, "args": None}, path)  # a training checkpoint, as released
    del state
    t1 = time.time()
    options = {"heads": True} if variant else {}
    model = load_pretrained(name, path, **options)
    latents = project_latents(model, images)
    tokens = model.encode(images)
    tokens = list(tokens) if isinstance(tokens, (tuple, list)) else [tokens]
    ref_tokens = [t.long() for t in expected["indices"]]
    decoded = model.decode(ref_tokens if len(ref_tokens) > 1 else ref_tokens[0])
    roundtrip = model.decode(tokens if len(tokens) > 1 else tokens[0])
    result = {
        "release": name,
        "seed": seed,
        "parameters": n_params,
        "images": list(images.shape),
        "tokens_per_codebook": ref_tokens[0].numel(),
        "latent_max_abs": max((a - b).abs().max().item() for a, b in zip(latents, expected["latents"])),
        "index_agreement": sum((a == b).sum().item() for a, b in zip(tokens, ref_tokens)) / sum(t.numel() for t in ref_tokens),
        "decode_max_abs": (decoded - expected["decoded"]).abs().max().item(),
        "roundtrip_max_abs": (roundtrip - expected["decoded"]).abs().max().item(),
        "ignored_keys": len(model.ignored_keys),
    }
    if variant:
        heads = [(n, b) for n, b in model.branches.items() if b.head is not None]
        result["head_max_abs"] = max(
            (b.head(b.quantizer.lookup(t)) - h).abs().max().item()
            for (n, b), t, h in zip(heads, ref_tokens[1:], expected["heads"]))
    result["passed"] = (result["index_agreement"] >= TOLERANCE["agreement"]
                        and result["decode_max_abs"] <= TOLERANCE["decode"]
                        and result["roundtrip_max_abs"] <= TOLERANCE["decode"])
    result["seconds"] = {"reference": round(t1 - t0, 1), "project": round(time.time() - t1, 1)}
    path.unlink()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llamagen", type=Path, required=True)
    parser.add_argument("--fqgan", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=list(reference.RELEASES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    clones = {"llamagen": args.llamagen, "fqgan": args.fqgan}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.only):
            result = check(name, clones, args.batch, seed=2000 + i, workdir=Path(tmp))
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    failed = [r["release"] for r in results if not r["passed"]]
    print("FAILED: " + ", ".join(failed) if failed else f"all {len(results)} releases within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
