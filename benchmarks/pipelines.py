"""Data pipeline, evaluator and generator throughput (images per second).

Data: ImageNet-sized JPEGs (500 x 375, quality 90; crops of scikit-image's bundled
photographs, so no download) written once into webdataset shards. ``raw`` is the floor
any loader pays: PIL decode + torchvision ``RandomResizedCrop`` (bilinear, a random part
of the image) + tensor conversion of bytes already in memory, in one process;
``raw-bicubic`` is the same for the transform tokbench trains with (SPEC: bicubic
short-side resize to [R, 1.25 R], then an R x R crop), done the plain way. ``tokbench`` is the training pipeline of
``data.webdataset_module`` (tar reading, shuffle buffer, decode, resize / crop / flip,
batching) with ``num_workers`` worker processes; ``jpeg_draft`` on or off.

Evaluator: images per second through rFID (random 64-d feature network: Inception
weights cannot be downloaded here) + LPIPS (random VGG16 backbone, same cost as the
real one) + SSIM + PSNR, as ``evaluation.runner`` computes them.

Generator: latent samples per second of ``diffusion.generator.LatentDiT`` with the Euler
sampler (no guidance / with guidance).
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import torch


def write_jpeg_shards(root: Path, count: int, size=(500, 375), per_shard: int = 100) -> Path:
    """``count`` JPEGs in webdataset shards under ``root`` (reused when present)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from data.demo import DEMO_PHOTOS, load_photo

    done = root / f"done-{count}"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(load_photo(name)) for name in DEMO_PHOTOS]
    for shard in range((count + per_shard - 1) // per_shard):
        with wds.TarWriter(str(root / f"train-{shard:06d}.tar")) as sink:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                photo = photos[i % len(photos)]
                w, h = photo.size
                cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                image = photo.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:08d}", "jpg": buffer.getvalue(), "cls": str(i % len(photos)).encode()})
    done.touch()
    return root


def run_data(spec: dict) -> dict:
    from benchmarks.measure import time_calls

    torch.set_num_threads(1)
    root = write_jpeg_shards(Path(spec["data_dir"]), spec["images"])
    res, batch = spec["resolution"], 32
    if spec["impl"].startswith("raw"):
        import random
        import tarfile

        import numpy as np
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        blobs = []
        for tar in sorted(root.glob("train-*.tar")):
            with tarfile.open(tar) as t:
                blobs += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]
        if spec["impl"] == "raw":
            crop = RandomResizedCrop(res)  # bilinear, a random 8-100 % of the area
        else:  # raw-bicubic: the paper's transform done plainly (whole image resized, then cropped)
            def crop(image):
                w, h = image.size
                short = random.randint(res, int(1.25 * res))
                size = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
                image = image.resize(size, Image.Resampling.BICUBIC)
                left, top = random.randint(0, size[0] - res), random.randint(0, size[1] - res)
                return image.crop((left, top, left + res, top + res))

        def epoch():
            for data in blobs:
                with Image.open(io.BytesIO(data)) as image:
                    image = crop(image.convert("RGB"))
                torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

        n = len(blobs)
    else:
        from data.webdataset_module import WebDatasetDataModule

        n = spec["images"] // batch * batch
        module = WebDatasetDataModule(root, train_shards="train-*.tar", val_shards=None, resolution=res,
                                      batch_size=batch, num_workers=spec["workers"], train_batches_per_epoch=n // batch,
                                      shuffle_buffer=100, jpeg_draft=spec.get("jpeg_draft", True), rank=0, world_size=1)
        module.setup("fit")
        loader = module.train_dataloader()

        def epoch():
            for _ in loader:
                pass

    result = time_calls(epoch, warmup=1, iters=spec.get("iters", 2))
    result["images_per_s"] = n / result["seconds"]
    return result


def run_evaluator(spec: dict) -> dict:
    from benchmarks.measure import time_calls
    from common.metrics import build_fid, build_lpips, psnr_per_image, ssim_per_image, to_pixels, to_uint8

    torch.manual_seed(0)
    res, batch = spec["resolution"], spec["batch"]
    fid = build_fid(random_features=True)
    lpips = build_lpips(allow_random=True)
    real = torch.rand(batch, 3, res, res) * 2 - 1
    fake = (real + 0.1 * torch.randn_like(real)).clamp(-1, 1)

    @torch.no_grad()
    def call():
        fid.update(to_uint8(real), real=True)
        fid.update(to_uint8(fake), real=False)
        lpips(fake, real)
        ssim_per_image(to_pixels(fake), to_pixels(real))
        psnr_per_image(to_pixels(fake), to_pixels(real))

    result = time_calls(call, warmup=1, iters=spec.get("iters", 2))
    result["images_per_s"] = batch / result["seconds"]
    return result


def run_generator(spec: dict) -> dict:
    from benchmarks.measure import time_calls
    from diffusion.generator import LatentDiT

    torch.manual_seed(0)
    model = LatentDiT(in_channels=spec["channels"], input_size=spec["size"], hidden=spec["hidden"],
                      depth=spec["depth"], heads=spec["heads"], num_classes=1000).eval()
    y = torch.randint(0, 1000, (spec["batch"],))

    def call():
        model.sample(y, steps=spec["steps"], guidance=spec.get("guidance", 1.0))

    result = time_calls(call, warmup=1, iters=spec.get("iters", 2))
    result["images_per_s"] = spec["batch"] / result["seconds"]
    return result
