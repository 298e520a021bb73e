"""One measurement in a fresh process: ``python -m benchmarks.child '<json spec>'``.

Prints one line ``BENCH_RESULT {json}`` (the runner parses it; everything else the
measured code prints is passed through). An optional ``mem_cap_gib`` caps the address
space, so that an implementation that would exhaust the machine's memory fails with a
MemoryError here (reported as out of memory) instead of taking the machine down."""
from __future__ import annotations

import json
import resource
import sys
import traceback

CASES = {
    "tokenizer_step": ("benchmarks.tokenizer_step", "run"),
    "flextok_step": ("benchmarks.flextok_step", "run"),
    "vq": ("benchmarks.quantizer", "run_vq"),
    "fsq": ("benchmarks.quantizer", "run_fsq"),
    "data": ("benchmarks.pipelines", "run_data"),
    "evaluator": ("benchmarks.pipelines", "run_evaluator"),
    "generator": ("benchmarks.pipelines", "run_generator"),
    "ddp": ("benchmarks.ddp", "run"),
}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if spec.get("mem_cap_gib"):
        cap = int(spec["mem_cap_gib"] * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    module_name, fn_name = CASES[spec["case"]]
    try:
        module = __import__(module_name, fromlist=[fn_name])
        result = getattr(module, fn_name)(spec)
        result["status"] = "ok"
    except (MemoryError, RuntimeError) as error:  # torch reports allocation failures as RuntimeError
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        oom = isinstance(error, MemoryError) or "alloc" in message.lower() or "memory" in message.lower()
        if not oom:
            traceback.print_exc()
        result = {"status": "oom" if oom else "error", "error": message[:300]}
    except Exception as error:  # noqa: BLE001 - reported in the table, not hidden
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(error).__name__}: {str(error)[:300]}"}
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
