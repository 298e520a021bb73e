"""Runs every measurement in fresh processes and keeps the medians.

Repeats are interleaved (every measurement once, then every measurement again, ...),
so that a change in the machine's load during the run hits ours and the peer's rows
alike: ratios are measured side by side."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.configs import ROOT
from benchmarks.plan import Measurement

MEDIAN_KEYS = ("seconds", "peak_rss_mib", "above_baseline_mib", "images_per_s", "load_1min")


def run_one(m: Measurement, python: str, timeout: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [python, "-m", "benchmarks.child", json.dumps(m.spec)]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
            if result.get("status") == "error":
                result["log_tail"] = (proc.stderr or "")[-1500:]
            result["process_seconds"] = round(time.time() - start, 1)
            return result
    # killed (e.g. by the kernel's OOM killer) or crashed before printing
    tail = (proc.stderr or proc.stdout or "")[-1500:]
    status = "oom" if proc.returncode in (-9, 137) else "error"
    return {"status": status, "error": f"exit code {proc.returncode}", "log_tail": tail}


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        first = runs[0] if runs else {"status": "not run"}
        return {"status": first.get("status"), "error": first.get("error"), "runs": runs}
    out = {"status": "ok", "runs": runs, "repeats_ok": len(ok)}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    profiled = sorted((r["kernels"] for r in ok if r.get("kernels", {}).get("heavy_share")),
                      key=lambda k: k["heavy_share"])
    if profiled:  # the run with the median share of time in convolution / matmul kernels
        out["kernels"] = profiled[len(profiled) // 2]
    if "params_m" in ok[0]:
        out["params_m"] = ok[0]["params_m"]
    out["peak_reset"] = all(r.get("peak_reset", False) for r in ok)
    return out


def run_all(measurements: list[Measurement], repeats: int, ref_python: str, timeout: int) -> None:
    runs: dict[str, list[dict]] = {m.key: [] for m in measurements}
    total = repeats * len(measurements)
    done = 0
    for repeat in range(repeats):
        for m in measurements:
            done += 1
            print(f"[{done}/{total}] {m.section}: {m.name} [{m.impl}] (repeat {repeat + 1}/{repeats})",
                  file=sys.stderr, flush=True)
            result = run_one(m, ref_python if m.reference else sys.executable, timeout)
            if result.get("status") != "ok":
                print(f"    -> {result.get('status')}: {result.get('error')}", file=sys.stderr, flush=True)
            runs[m.key].append(result)
    for m in measurements:
        m.result = summarise(runs[m.key])
