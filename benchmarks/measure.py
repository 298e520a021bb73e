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


def _load() -> float | None:
    try:
        import os

        return os.getloadavg()[0]
    except OSError:
        return None
