"""DDP scaling on CPU: the demo-scale VQGAN trained by 1 rank (all the cores' threads)
or N ranks (gloo, threads split between them), each with the same per-rank batch.
Throughput = ranks x batch / step time of rank 0; scaling = N-rank / 1-rank throughput."""
from __future__ import annotations

import json
import os
import socket
import tempfile

import torch
import torch.nn.functional as F


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, spec: dict, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from benchmarks.configs import compose_train
    from benchmarks.measure import time_calls
    from hydra.utils import instantiate

    torch.set_num_threads(max(1, spec["threads"] // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = instantiate(compose_train(["tokenizer=vqgan", "scale=demo"]).tokenizer)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
    x = torch.rand(spec["batch"], 3, spec["resolution"], spec["resolution"]) * 2 - 1

    def step():
        out = model(x)
        loss = sum(out.losses.values()) + F.mse_loss(out.reconstruction, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = time_calls(step, warmup=2, iters=spec.get("iters", 5))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.destroy_process_group()


def run(spec: dict) -> dict:
    world = spec["ranks"]
    with tempfile.TemporaryDirectory() as out_dir:
        if world == 1:
            _worker(0, 1, spec, 0, out_dir)
        else:
            torch.multiprocessing.spawn(_worker, args=(world, spec, _free_port(), out_dir), nprocs=world)
        with open(os.path.join(out_dir, "rank0.json")) as f:
            result = json.load(f)
    result["images_per_s"] = world * spec["batch"] / result["seconds"]
    return result
