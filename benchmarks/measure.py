"""What one fresh benchmark process measures about itself: wall time and resident memory.

Memory is the process's resident set (RSS), read from ``/proc/self/status``: the peak
(``VmHWM``) is reset just before the measured calls (``/proc/self/clear_refs``, Linux
>= 4.0), so ``peak_rss`` is the high-water mark of the measured calls alone and
``above_baseline`` = peak - RSS just before them (model, optimizer state and imports
excluded). Where the reset is not available the peak is ``getrusage``'s ``ru_maxrss``
over the whole process and the result says so (``peak_reset: false``).
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kib / 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024


def time_calls(fn: Callable[[], object], warmup: int = 1, iters: int = 2) -> dict:
    """Run ``fn`` ``warmup`` times unmeasured, then ``iters`` times measured.

    Returns the median seconds per call, every timing, the memory figures above and
    the 1-minute load average at the end (the machine is shared)."""
    for _ in range(warmup):
        fn()
    baseline = rss_mib()
    peak_reset = reset_peak()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    peak = peak_mib()
    return {
        "seconds": statistics.median(times),
        "times": times,
        "peak_rss_mib": peak,
        "baseline_rss_mib": baseline,
        "above_baseline_mib": max(0.0, peak - baseline),
        "peak_reset": peak_reset,
        "load_1min": _load(),
    }


# the kernels both sides of a comparison call alike (oneDNN / BLAS): their time is what no
# code around them can remove
HEAVY_KERNELS = {
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
                    "aten::cudnn_convolution", "aten::cudnn_convolution_backward"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_efficient_attention_forward",
               "aten::_efficient_attention_backward", "aten::_flash_attention_forward", "aten::_flash_attention_backward"),
}


def kernel_seconds(fn: Callable[[], object]) -> dict:
    """One profiled call of ``fn``: the self time of the convolution and matrix-multiply
    kernels and of all ops. ``heavy_share`` bounds what any change around those kernels can
    gain: a step is at most ``1 / heavy_share`` times faster if everything else took no time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    out = {kind: sum(e.self_cpu_time_total for e in events if e.key in names) / 1e6
           for kind, names in HEAVY_KERNELS.items()}
    out["profiled_s"] = total
    out["heavy_share"] = (sum(out[k] for k in HEAVY_KERNELS) / total) if total else None
    return out


def _load() -> float | None:
    try:
        import os

        return os.getloadavg()[0]
    except OSError:
        return None
