"""Run LlamaGen's and FQGAN's reference tokenizer code and save what it computes.

Nothing from the references is copied into tokbench: this script imports their model files
at run time from local clones of https://github.com/FoundationVision/LlamaGen
(``tokenizer/tokenizer_image/vq_model.py``) and https://github.com/showlab/FQGAN
(``tokenizer/vq_model_dual.py``, ``tokenizer/vq_model_triple.py``), the code that loads
``vq_ds{16,8}_c2i.pt`` and ``fqgan_{dual,triple}_ds{16,8}.pt``.

Reduced sizes (``small``, the parity fixtures of ``tests/test_parity_vq.py``): every level,
res block, attention block, branch adapter (6 blocks, 8 heads) and representation head
(3 blocks, 8 heads) of the released architectures, at width 32 (GroupNorm(32) is the
reference's floor) instead of 128, codebooks of 256 x 8, z_channels 32, head width 64, on
four 32 px images (positional grids 2 x 2 at ds16, 4 x 4 at ds8). The reference hard-codes some
of these (``Encoder(ch=128)``, the adapters' width 512, the heads' widths, the 256 px grids):
the script overrides exactly those attributes on the reference classes, nothing else.

The weights are random: ``tokenizers.pretrained.synthetic.seeded_state_dict`` draws them
from a seed in the reference's own layout, and they are loaded into the reference model
strictly. A fixture stores the layout (key -> shape), the seed, the input images (uint8),
the reference's continuous latents before quantization (``quant_conv`` outputs), its token
indices (``encode``), its decoded images (``decode_code`` of those indices) and, for FQGAN,
its representation heads' class-token outputs. Each is a few tens
of kB; the test rebuilds the weights from layout and seed.

Regenerate (from the tokbench repository root; any Python with torch and einops, e.g. the
reference venv):

    git clone https://github.com/FoundationVision/LlamaGen /path/LlamaGen
    git clone https://github.com/showlab/FQGAN /path/FQGAN
    python scripts/parity/llamagen_fqgan_reference.py --llamagen /path/LlamaGen --fqgan /path/FQGAN \\
        --out tests/fixtures/parity

The same run also writes ``llamagen_fqgan_layouts.json``: the state-dict layout (key ->
shape) of each released architecture at full size, built by the reference code on the meta
device (no weights); the fast suite checks the project's full-size models against it.
``llamagen_fqgan_fullsize_check.py`` uses the same builders (``reference_model``) at full size.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tokenizers.pretrained.synthetic import layout_of, seeded_state_dict  # noqa: E402

REFERENCE_FILES = {
    "llamagen": "tokenizer/tokenizer_image/vq_model.py",
    "fqgan_dual": "tokenizer/vq_model_dual.py",
    "fqgan_triple": "tokenizer/vq_model_triple.py",
}

#: the releases the fixtures stand for: (reference module, variant, ds)
RELEASES = {
    "llamagen_vq16": ("llamagen", None, 16),
    "llamagen_vq8": ("llamagen", None, 8),
    "fqgan_dual_ds16": ("fqgan_dual", "dual", 16),
    "fqgan_triple_ds16": ("fqgan_triple", "triple", 16),
    "fqgan_dual_ds8": ("fqgan_dual", "dual", 8),
    "fqgan_triple_ds8": ("fqgan_triple", "triple", 8),
}

#: reduced sizes of the fixtures (reference names); "full" is the released architecture
SMALL = dict(ch=32, z_channels=32, codebook_size=256, code_dim=8, head_width=64, image_size=32, batch=4)
FULL = dict(ch=128, z_channels=256, codebook_size=16384, code_dim=8, head_width=None, image_size=256, batch=2)


def import_reference(clone: Path, relative: str, name: str):
    """Import one reference model file from a local clone under a private module name (both
    repositories have a top-level package ``tokenizer``)."""
    path = Path(clone) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. Fix: pass the root of a local clone of the reference repository.")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def overridden(cls, **values):
    """Make ``cls`` instances read ``values`` for attributes their ``__init__`` hard-codes
    (``self.width = 512``): a class-level property whose setter ignores the assignment."""
    saved = {k: cls.__dict__.get(k) for k in values}
    for key, value in values.items():
        setattr(cls, key, property(lambda self, v=value: v, lambda self, _: None))
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                delattr(cls, key)
            else:
                setattr(cls, key, old)


@contextlib.contextmanager
def default_width(module, ch: int):
    """``VQModel`` builds ``Encoder(...)`` / ``Decoder(...)`` without ``ch`` (128): default it to ``ch``."""
    originals = {cls: cls.__init__ for cls in (module.Encoder, module.Decoder)}

    def wrap(init):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("ch", ch)
            init(self, *args, **kwargs)
        return __init__

    for cls, init in originals.items():
        cls.__init__ = wrap(init)
    try:
        yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


def reference_model(module, kind: str, ds: int, size: dict):
    """The reference ``VQModel`` at ``size`` (random init; the caller loads weights)."""
    factory = {16: module.VQ_16, 8: module.VQ_8}[ds]
    kwargs = dict(codebook_size=size["codebook_size"], codebook_embed_dim=size["code_dim"], z_channels=size["z_channels"])
    if kind == "llamagen":
        with default_width(module, size["ch"]):
            return factory(**kwargs).eval()
    grid = size["image_size"] // ds
    trunk = size["ch"] * 4  # the last multiplier is 4 in both VQ_16 and VQ_8
    adapter = dict(grid_size=grid, width=trunk) if size["ch"] != 128 or grid != 256 // ds else {}
    head = dict(grid_size=grid) if grid != 256 // ds else {}
    if size["head_width"]:
        head["width"] = size["head_width"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(default_width(module, size["ch"]))
        if adapter:
            stack.enter_context(overridden(module.FactorizedAdapter, **adapter))
        if head:
            stack.enter_context(overridden(module.FeatPredHead, **head))
        with contextlib.redirect_stdout(sys.stderr):  # the reference prints its codebook sizes
            return factory(with_clip_supervision=True, **kwargs, **{}).eval()


def test_images(size: dict, seed: int) -> torch.Tensor:
    """uint8 images: smooth colour ramps plus noise (read as ``x / 127.5 - 1`` by both sides)."""
    g = torch.Generator().manual_seed(seed)
    n, s = size["batch"], size["image_size"]
    ramp = torch.linspace(0, 1, s)
    base = torch.stack([ramp[None, :].expand(s, s), ramp[:, None].expand(s, s), (ramp[None, :] * ramp[:, None])])
    imgs = 0.6 * base[None] + 0.4 * torch.rand(n, 3, s, s, generator=g)
    return (imgs * 255).round().clamp(0, 255).to(torch.uint8)


def as_input(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


@torch.no_grad()
def run_reference(model, kind: str, images: torch.Tensor) -> dict:
    """Latents before quantization and token indices (one per codebook, in the project's
    branch order), decoded images from those indices and, for FQGAN, the heads' class-token
    outputs."""
    b = images.shape[0]
    if kind == "llamagen":
        latents = [model.quant_conv(model.encoder(images))]
        quant, _, info = model.encode(images)
        shape = quant.shape
        indices = [info[2].reshape(b, shape[2], shape[3])]
        decoded = model.decode_code(info[2], shape)
        return {"latents": latents, "indices": indices, "decoded": decoded}
    if kind == "fqgan_dual":
        h_sem, h_vis = model.encoder(images)
        latents = [model.quant_conv_vis(h_vis), model.quant_conv_sem(h_sem)]
        quant_sem, quant_vis, info_sem, info_vis = model.encode(images)
        quants, infos = [quant_vis, quant_sem], [info_vis, info_sem]
        heads = [model.feat_pred_head(quant_sem)[:, 0]]
        decoded = model.decode_code(info_sem[2], info_vis[2], quant_sem.shape, quant_vis.shape)
    else:
        h_vis, h_mid, h_high = model.encoder(images)
        latents = [model.quant_conv_vis(h_vis), model.quant_conv_sem_mid(h_mid), model.quant_conv_sem_high(h_high)]
        quant_vis, quant_mid, quant_high, info_vis, info_mid, info_high = model.encode(images)
        quants, infos = [quant_vis, quant_mid, quant_high], [info_vis, info_mid, info_high]
        heads = [model.mid_sem_feat_pred(quant_mid)[:, 0], model.high_sem_feat_pred(quant_high)[:, 0]]
        decoded = model.decode_code(info_vis[2], info_mid[2], info_high[2], quant_vis.shape, quant_mid.shape, quant_high.shape)
    h, w = quants[0].shape[2:]
    indices = [info[2].reshape(b, h, w) for info in infos]
    return {"latents": latents, "indices": indices, "decoded": decoded, "heads": heads}


def reference_commit(clone: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


def make_fixture(name: str, clones: dict[str, Path], seed: int, size: dict = SMALL) -> dict:
    kind, variant, ds = RELEASES[name]
    repo = "llamagen" if kind == "llamagen" else "fqgan"
    module = import_reference(clones[repo], REFERENCE_FILES[kind], f"_reference_{kind}")
    model = reference_model(module, kind, ds, size)
    layout = layout_of(model.state_dict())
    model.load_state_dict(seeded_state_dict(layout, seed), strict=True)
    images = test_images(size, seed)
    out = run_reference(model, kind, as_input(images))
    arch = dict(ds=ds, width=size["ch"], z_channels=size["z_channels"], codebook_size=size["codebook_size"],
                code_dim=size["code_dim"])
    if variant:
        arch.update(variant=variant, head_width=size["head_width"], pos_grid=size["image_size"] // ds)
    return {
        "release": name,
        "reference": f"{'FoundationVision/LlamaGen' if repo == 'llamagen' else 'showlab/FQGAN'} "
                     f"{REFERENCE_FILES[kind]} @ {reference_commit(clones[repo])}",
        "architecture": arch,
        "layout": layout,
        "seed": seed,
        "images_uint8": images,
        "latents": [z.float() for z in out["latents"]],
        "indices": [i.to(torch.int16 if size["codebook_size"] <= 32767 else torch.int32) for i in out["indices"]],
        "decoded": out["decoded"].float(),
        "heads": [h.float() for h in out.get("heads", [])],
    }


def full_layout(name: str, clones: dict[str, Path]) -> dict[str, list[int]]:
    """The released architecture's state-dict layout, from the reference code on the meta device."""
    kind, _, ds = RELEASES[name]
    repo = "llamagen" if kind == "llamagen" else "fqgan"
    module = import_reference(clones[repo], REFERENCE_FILES[kind], f"_reference_{kind}")
    with torch.device("meta"):
        return layout_of(reference_model(module, kind, ds, FULL).state_dict())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llamagen", type=Path, required=True, help="local clone of FoundationVision/LlamaGen")
    parser.add_argument("--fqgan", type=Path, required=True, help="local clone of showlab/FQGAN")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "parity")
    parser.add_argument("--only", nargs="*", default=sorted(RELEASES), help="release names to regenerate")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    clones = {"llamagen": args.llamagen, "fqgan": args.fqgan}
    layouts = {name: full_layout(name, clones) for name in sorted(RELEASES)}
    path = args.out / "llamagen_fqgan_layouts.json"
    path.write_text(json.dumps(layouts, separators=(",", ":")))
    print(f"{path}: {path.stat().st_size / 1024:.0f} kB, full-size layouts of {', '.join(layouts)}")
    for i, name in enumerate(sorted(RELEASES)):
        if name not in args.only:
            continue
        fixture = make_fixture(name, clones, seed=1000 + i)
        path = args.out / f"{name}.pt"
        torch.save(fixture, path)
        print(f"{path}: {path.stat().st_size / 1024:.0f} kB, {len(fixture['layout'])} tensors, "
              f"indices {[tuple(t.shape) for t in fixture['indices']]}")


if __name__ == "__main__":
    main()
