"""``python -m benchmarks [--quick] [--out DIR] [--ref DIR]``: see benchmarks/__init__.py."""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import plan as planning
from benchmarks.configs import ROOT
from benchmarks.report import compare, machine_info, write_report
from benchmarks.runner import run_all


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes, one repeat (< 10 min on 2 idle cores)")
    p.add_argument("--out", default=None, help="output folder (default: logs/benchmarks/<time>)")
    p.add_argument("--ref", default=None,
                   help="folder with local clones of LlamaGen, FQGAN, LightningDiT and ml-flextok (reference rows)")
    p.add_argument("--ref-python", default=sys.executable,
                   help="interpreter for the reference rows (one with their extra deps, e.g. einops)")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per measurement (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per process (default 2)")
    p.add_argument("--sections", default=None,
                   help="comma list of: tokenizer_step, quantizer, flextok_step, data, evaluator, generator, ddp")
    p.add_argument("--mem-cap-gib", type=float, default=16.0,
                   help="address-space cap (virtual memory, incl. ~4 GiB of mapped libraries) for peers that may exhaust memory; hitting it is reported as out of memory")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per measurement process")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    ref = str(Path(args.ref).resolve()) if args.ref else None
    if ref:
        missing = [r for r in ("LlamaGen", "FQGAN", "LightningDiT", "ml-flextok") if not (Path(ref) / r).is_dir()]
        if missing:
            print(f"--ref {ref}: no clone of {', '.join(missing)} there; their rows will fail. Fix: clone them "
                  "there (github.com/FoundationVision/LlamaGen, showlab/FQGAN, hustvl/LightningDiT, "
                  "apple/ml-flextok).", file=sys.stderr)
    out = Path(args.out or ROOT / "logs" / "benchmarks" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(os.environ.get("TOKBENCH_CACHE", Path.home() / ".cache" / "tokbench")) / "benchmark_jpegs"
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sections = set(args.sections.split(",")) if args.sections else None
    measurements, comparisons = planning.build(args.quick, ref, args.threads, device, str(data_dir), sections,
                                               args.mem_cap_gib)
    repeats = args.repeats or (1 if args.quick else 3)
    machine = machine_info(args.threads)
    start = time.time()
    run_all(measurements, repeats, args.ref_python, args.timeout)
    machine["load_average_end"] = list(os.getloadavg())
    machine["wall_seconds"] = round(time.time() - start, 1)
    settings = {"quick": args.quick, "repeats": repeats, "threads": args.threads, "ref": ref,
                "ref_python": args.ref_python if ref else None, "mem_cap_gib": args.mem_cap_gib,
                "reference_rows": "measured" if ref else "skipped: no --ref given"}
    rows = compare(measurements, comparisons)
    md, js = write_report(out, machine, settings, measurements, rows)
    print(f"Wrote {md} and {js} in {machine['wall_seconds']:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
