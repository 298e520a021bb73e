"""What ``python -m benchmarks`` measures: a list of measurements (one fresh process each,
repeated), and which pairs of them are compared (ratios measured in the same run)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Measurement:
    section: str
    name: str  # the row label within the section
    impl: str  # tokbench, tokbench-<variant>, or the peer's name
    spec: dict
    reference: bool = False  # imports a local reference clone (--ref): its own interpreter
    result: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.section}/{self.name}/{self.impl}"


@dataclass
class Comparison:
    section: str
    label: str
    ours: str  # Measurement.key
    peer: str
    time_target: float | None = None  # speed-up (peer time / our time) required, if any
    memory_target: float | None = None  # our peak / peer peak allowed, if any
    throughput: bool = False  # compare images_per_s instead of seconds


# reference architectures and step sizes (SPEC.md; issue 12's targets)
TOKENIZER_SIZES = {"vqgan": (128, 8), "fqgan_dual": (256, 2), "fqgan_triple": (256, 2), "vae": (128, 8)}
QUICK_TOKENIZER_SIZES = {"vqgan": (64, 2), "fqgan_dual": (256, 1), "vae": (64, 2)}
PEERS = {"vqgan": "llamagen", "fqgan_dual": "fqgan", "fqgan_triple": "fqgan", "vae": "ldm"}
PRECISIONS = ("fp32", "bf16-mixed")


def build(quick: bool, ref: str | None, threads: int, device: str, data_dir: str, sections: set[str] | None,
          mem_cap_gib: float) -> tuple[list[Measurement], list[Comparison]]:
    ms: list[Measurement] = []
    cs: list[Comparison] = []

    def want(section: str) -> bool:
        return sections is None or section in sections

    def add(section, name, impl, spec, reference=False) -> Measurement:
        spec = {"threads": threads, "impl": impl, **spec}
        if reference:
            spec["ref"] = ref
        m = Measurement(section, name, impl, spec, reference)
        ms.append(m)
        return m

    # -- tokenizer training steps -----------------------------------------------------------
    if want("tokenizer_step"):
        sizes = QUICK_TOKENIZER_SIZES if quick else TOKENIZER_SIZES
        devices = ["cpu"] + (["cuda"] if device == "cuda" else [])
        for dev in devices:
            for family, (res, batch) in sizes.items():
                for precision in PRECISIONS:
                    name = f"{family} {res}px b{batch} {precision}" + (" cuda" if dev == "cuda" else "")
                    base = {"case": "tokenizer_step", "family": family, "resolution": res, "batch": batch,
                            "precision": precision, "device": dev, "warmup": 1, "iters": 1}
                    ours = add("tokenizer_step", name, "tokbench", {**base, "fused_adam": True, "profile": True})
                    if family == "vqgan":  # before/after of each switch the reference scale turns on
                        for impl, change in (("tokbench-foreach-adam", {"fused_adam": False}),
                                             ("tokbench-contiguous", {"channels_last": False}),
                                             ("tokbench-no-recompute", {"recompute_norm_act": False})):
                            other = add("tokenizer_step", name, impl, {**base, "fused_adam": True, **change})
                            cs.append(Comparison("tokenizer_step", f"{name}: {impl[9:]} -> default", ours.key,
                                                 other.key))
                    if ref:
                        peer = add("tokenizer_step", name, PEERS[family], {**base, "fused_adam": False}, reference=True)
                        full_size = not quick and dev == "cpu"
                        cs.append(Comparison("tokenizer_step", name, ours.key, peer.key,
                                             time_target=(1.15 if precision == "fp32" else 1.5) if full_size else None,
                                             memory_target=0.8 if full_size else None))
                        if precision == "bf16-mixed":  # the peer as its code runs on a CPU: fp32
                            cs.append(Comparison("tokenizer_step", f"{name} vs {PEERS[family]} fp32",
                                                 ours.key, peer.key.replace("bf16-mixed", "fp32")))

    # -- quantizers ---------------------------------------------------------------------------
    if want("quantizer"):
        for tokens in (2048, 16384) if quick else (2048, 16384, 65536):
            name = f"VQ 16384x8, {tokens} tokens"
            base = {"case": "vq", "tokens": tokens, "warmup": 1, "iters": 2 if tokens <= 16384 else 1}
            ours = add("quantizer", name, "tokbench", base)
            prev = add("quantizer", name, "tokbench-previous", base)
            cs.append(Comparison("quantizer", f"{name}: before -> after", ours.key, prev.key))
            vqt = add("quantizer", name, "vqtorch", {**base, "mem_cap_gib": mem_cap_gib})
            cs.append(Comparison("quantizer", f"{name} vs vector-quantize-pytorch", ours.key, vqt.key))
            if ref:
                peer = add("quantizer", name, "llamagen", {**base, "mem_cap_gib": mem_cap_gib}, reference=True)
                cs.append(Comparison("quantizer", f"{name} vs LlamaGen", ours.key, peer.key,
                                     time_target=3.0 if tokens == 2048 else None))
        tokens = 16384
        name = f"VQ 16384x8 + entropy 0.03, {tokens} tokens"
        base = {"case": "vq", "tokens": tokens, "entropy_weight": 0.03, "warmup": 1, "iters": 1}
        ours = add("quantizer", name, "tokbench", base)
        if ref:
            peer = add("quantizer", name, "llamagen", {**base, "mem_cap_gib": mem_cap_gib}, reference=True)
            cs.append(Comparison("quantizer", f"{name} vs LlamaGen", ours.key, peer.key))
        name = "FSQ [8,8,8,5,5,5], 65536 tokens"
        base = {"case": "fsq", "tokens": 65536}
        ours = add("quantizer", name, "tokbench", base)
        peer = add("quantizer", name, "vqtorch", base)
        cs.append(Comparison("quantizer", f"{name} vs vector-quantize-pytorch", ours.key, peer.key))

    # -- FlexTok ------------------------------------------------------------------------------
    if want("flextok_step") and not quick:
        for precision in PRECISIONS:
            name = f"flextok d4/4 w768 R256 16x32x32 b2 {precision}"
            base = {"case": "flextok_step", "precision": precision, "warmup": 1, "iters": 1}
            ours = add("flextok_step", name, "tokbench", {**base, "profile": True})
            add("flextok_step", name, "tokbench-activation-checkpointing", {**base, "activation_checkpointing": True})
            if ref:
                peer = add("flextok_step", name, "ml-flextok", base, reference=True)
                cs.append(Comparison("flextok_step", name, ours.key, peer.key,
                                     time_target=1.5 if precision == "fp32" else None))

    # -- data pipeline -----------------------------------------------------------------------
    if want("data"):
        images = 384 if quick else 960
        for res in (256, 128):
            name = f"500x375 JPEG -> {res}px"
            base = {"case": "data", "resolution": res, "images": images, "data_dir": data_dir, "threads": 1}
            raw = add("data", name, "raw", base)
            bicubic = add("data", name, "raw-bicubic", base)
            one = add("data", name, "tokbench", {**base, "workers": 0})
            cs.append(Comparison("data", f"{name}: per core vs raw decode + crop", one.key, raw.key, time_target=0.9,
                                 throughput=True))
            cs.append(Comparison("data", f"{name}: per core vs raw decode + the same bicubic resize + crop", one.key,
                                 bicubic.key, throughput=True))
            nodraft = add("data", name, "tokbench-no-draft", {**base, "workers": 0, "jpeg_draft": False})
            cs.append(Comparison("data", f"{name}: draft decode on vs off", one.key, nodraft.key, throughput=True))
            if res == 256:
                by_workers = {}
                for workers in (1, 2):
                    w = by_workers[workers] = add("data", name, f"tokbench-{workers}-workers", {**base, "workers": workers})
                    cs.append(Comparison("data", f"{name}: {workers} workers vs in-process", w.key, one.key,
                                         throughput=True))
                cs.append(Comparison("data", f"{name}: 2 workers vs 1 worker", by_workers[2].key, by_workers[1].key,
                                     throughput=True))

    # -- evaluator, generator, DDP -----------------------------------------------------------------
    if want("evaluator"):
        res = 128 if quick else 256
        add("evaluator", f"rFID + LPIPS + SSIM + PSNR, {res}px b8", "tokbench",
            {"case": "evaluator", "resolution": res, "batch": 8})
    if want("generator"):
        if quick:
            g = {"hidden": 384, "depth": 6, "heads": 6, "steps": 10}
        else:
            g = {"hidden": 768, "depth": 12, "heads": 12, "steps": 25}
        for guidance in (1.0, 2.0):
            add("generator", f"LatentDiT {g['hidden']}/{g['depth']} on 32x16x16, {g['steps']} Euler steps, "
                f"CFG {guidance}", "tokbench",
                {"case": "generator", "channels": 32, "size": 16, "batch": 4, "guidance": guidance, **g})
    if want("ddp"):
        base = {"case": "ddp", "resolution": 64, "batch": 8, "iters": 3 if quick else 6}
        one = add("ddp", "demo VQGAN 64px b8/rank", "tokbench-1-rank", {**base, "ranks": 1})
        two = add("ddp", "demo VQGAN 64px b8/rank", "tokbench-2-ranks", {**base, "ranks": 2})
        cs.append(Comparison("ddp", "2 ranks vs 1 rank (gloo, CPU)", two.key, one.key, throughput=True))
    return ms, cs
