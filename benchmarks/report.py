"""Machine facts, ratios and the Markdown + JSON report."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from benchmarks.configs import ROOT
from benchmarks.plan import Comparison, Measurement

LIBRARIES = ("torch", "torchvision", "pytorch-lightning", "vector-quantize-pytorch", "webdataset", "pillow", "timm",
             "torchmetrics", "numpy")
MEMORY_NOTE = ("Memory: resident set size (RSS) of the measuring process from /proc/self/status. 'peak' is the "
               "high-water mark during the measured calls (VmHWM reset just before them), i.e. model, optimizer "
               "state and working memory; 'above base' is peak minus the RSS just before the measured calls.")

BOUND_NOTE = ("bound: the speed-up tokbench would have if every op of its step except the convolution and "
              "matrix-multiply kernels took no time (peer time / our time in those kernels, from one profiled "
              "step after the timed ones); a target above it cannot be met by code around those kernels.")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info(threads: int) -> dict:
    import torch

    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(), "gpu": gpu,
        "python": platform.python_version(), "platform": platform.platform(), "threads_per_process": threads,
        "load_average_start": list(os.getloadavg()), "libraries": versions, "commit": commit,
        "bf16_cpu_kernels": "amx_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None,
    }


def compare(measurements: list[Measurement], comparisons: list[Comparison]) -> list[dict]:
    by_key = {m.key: m for m in measurements}
    rows = []
    for c in comparisons:
        ours, peer = by_key[c.ours].result, by_key[c.peer].result
        row = {"section": c.section, "label": c.label, "ours": c.ours, "peer": c.peer,
               "time_target": c.time_target, "memory_target": c.memory_target}
        if ours.get("status") == "ok" and peer.get("status") == "ok":
            if c.throughput:
                row["speedup"] = ours["images_per_s"] / peer["images_per_s"]
            else:
                row["speedup"] = peer["seconds"] / ours["seconds"]
                row["memory_ratio"] = ours["peak_rss_mib"] / peer["peak_rss_mib"]
                share = (ours.get("kernels") or {}).get("heavy_share")
                if share and by_key[c.peer].reference:  # the speed-up if every op of ours but the convolutions / matmuls took no time
                    row["bound"] = peer["seconds"] / (ours["seconds"] * share)
        elif ours.get("status") == "ok":
            row["note"] = f"peer {peer.get('status')}: {peer.get('error')}"
        else:
            row["note"] = f"ours {ours.get('status')}: {ours.get('error')}"
        met = []
        if c.time_target is not None:
            met.append(row.get("speedup") is not None and row["speedup"] >= c.time_target
                       or (row.get("speedup") is None and ours.get("status") == "ok" and peer.get("status") == "oom"))
        if c.memory_target is not None:
            met.append(row.get("memory_ratio") is not None and row["memory_ratio"] <= c.memory_target)
        row["target_met"] = all(met) if met else None
        rows.append(row)
    return rows


def _num(value, digits=2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _measurement_table(ms: list[Measurement]) -> list[str]:
    lines = ["| measurement | implementation | median s | img/s | peak RSS MiB | above base MiB | status |",
             "|---|---|---:|---:|---:|---:|---|"]
    for m in ms:
        r = m.result
        status = r.get("status", "not run")
        if status != "ok":
            status = f"{status}: {r.get('error', '')}"[:90]
        else:
            status = f"ok ({r.get('repeats_ok')}x)"
        lines.append(f"| {m.name} | {m.impl} | {_num(r.get('seconds'), 3)} | {_num(r.get('images_per_s'), 2)} | "
                     f"{_num(r.get('peak_rss_mib'), 0)} | {_num(r.get('above_baseline_mib'), 0)} | {status} |")
    return lines


def _ratio_table(rows: list[dict]) -> list[str]:
    lines = ["| comparison | speed-up (x) | bound (x) | memory (ours / peer) | target | met |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        target = []
        if r["time_target"] is not None:
            target.append(f">= {r['time_target']}x")
        if r["memory_target"] is not None:
            target.append(f"memory <= {r['memory_target']}x")
        met = {True: "yes", False: "**no**", None: "-"}[r["target_met"]]
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['label']}{note} | {_num(r.get('speedup'))} | {_num(r.get('bound'))} | "
                     f"{_num(r.get('memory_ratio'))} | "
                     f"{', '.join(target) or '-'} | {met} |")
    return lines


SECTION_TITLES = {
    "tokenizer_step": "Tokenizer training step (forward + losses + backward + Adam)",
    "quantizer": "Quantizers (forward + backward)",
    "flextok_step": "FlexTok training step (reduced config)",
    "data": "Data pipeline (images per second, 1 thread)",
    "evaluator": "Evaluator throughput (random feature networks)",
    "generator": "Generator sampling throughput",
    "ddp": "DDP scaling on CPU",
}


def write_report(out: Path, machine: dict, settings: dict, measurements: list[Measurement],
                 rows: list[dict]) -> tuple[Path, Path]:
    js = out / "benchmark.json"
    md = out / "benchmark.md"
    payload = {"machine": machine, "settings": settings,
               "measurements": [{"section": m.section, "name": m.name, "impl": m.impl, "spec": m.spec,
                                 "reference": m.reference, **m.result} for m in measurements],
               "comparisons": rows}
    js.write_text(json.dumps(payload, indent=2))
    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items() if v)
    lines = [
        "# tokbench benchmark", "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU")
        + f"; {machine['threads_per_process']} intra-op threads per process",
        f"- load average (1/5/15 min) at start {', '.join(_num(v) for v in machine['load_average_start'])}, "
        f"at end {', '.join(_num(v) for v in machine.get('load_average_end', []))}",
        f"- libraries: {libs}; python {machine['python']}; commit {machine.get('commit')}",
        f"- {'quick' if settings['quick'] else 'full'} run, median of {settings['repeats']} fresh process(es) per "
        f"figure, repeats interleaved; reference rows: {settings['reference_rows']}; wall time "
        f"{machine.get('wall_seconds')} s",
        f"- {MEMORY_NOTE}", "",
        "## Ratios (measured side by side in this run; speed-up = peer time / our time, or our images/s / peer's)",
        "", BOUND_NOTE, "", *_ratio_table(rows), "",
    ]
    for section, title in SECTION_TITLES.items():
        ms = [m for m in measurements if m.section == section]
        if ms:
            lines += [f"## {title}", "", *_measurement_table(ms), ""]
    md.write_text("\n".join(lines))
    return md, js
