"""Benchmark: DINO multi-crop images/s per worker, ours vs the reference torchvision pipeline.

Both pipelines run in this process on the same ImageNet-sized JPEGs (photos from scikit-image,
rescaled and cropped to ~500x375 like an average ImageNet image), one thread each, so the ratio is
the per-DataLoader-worker speed-up. The reference is DINO's DataAugmentationDINO composition: PIL
decode, then torchvision RandomResizedCrop / flip / ColorJitter / grayscale / PIL Gaussian blur /
solarize, ToTensor and Normalize per crop.

    mokd-bench data [--images 64] [--seconds 8] [--locals 8] [--loader-workers N] [--out FILE]
"""
from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
import tempfile
import time
import types

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from mokd_scale.data.multicrop import MultiCrop, stack_crops

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
           "retina", "cat")


def make_bench_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` JPEGs of ImageNet's typical size (~500x375, some portrait), from real photos."""
    import skimage.data
    rng = random.Random(seed)
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in _PHOTOS]
    jpegs = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = rng.choice([(500, 375), (500, 333), (375, 500), (500, 400), (640, 480)])
        zoom = rng.uniform(1.0, 1.6) * max(width / photo.width, height / photo.height)
        big = photo.resize((int(photo.width * zoom) + 1, int(photo.height * zoom) + 1), Image.BICUBIC)
        left, top = rng.randint(0, big.width - width), rng.randint(0, big.height - height)
        buf = io.BytesIO()
        big.crop((left, top, left + width, top + height)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    return jpegs


# ---- the reference: DINO's composition with torchvision's PIL transforms ----

class _MaybeBlur:
    """PIL Gaussian blur with probability p, sigma ~ U(0.1, 2.0) (DINO's helper)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _MaybeSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def reference_transform(global_size=224, local_size=96, num_locals=8,
                        global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)):
    """Callable PIL image -> list of normalised float crops, as DINO's DataAugmentationDINO."""
    flip_and_jitter = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ])
    to_normalised = transforms.Compose([transforms.ToTensor(),
                                        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    bicubic = transforms.InterpolationMode.BICUBIC
    global1 = transforms.Compose([
        transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
        flip_and_jitter, _MaybeBlur(1.0), to_normalised])
    global2 = transforms.Compose([
        transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
        flip_and_jitter, _MaybeBlur(0.1), _MaybeSolarize(0.2), to_normalised])
    local = transforms.Compose([
        transforms.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic),
        flip_and_jitter, _MaybeBlur(0.5), to_normalised])

    def transform(img):
        return [global1(img), global2(img)] + [local(img) for _ in range(num_locals)]
    return transform


def _dino_data_cfg(num_locals: int):
    return types.SimpleNamespace(
        global_crop_size=224, local_crop_size=96, num_local_crops=num_locals,
        global_crop_scale=(0.4, 1.0), local_crop_scale=(0.05, 0.4), color_jitter_prob=0.8,
        grayscale_prob=0.2, blur_prob_global=(1.0, 0.1), blur_prob_local=0.5,
        solarize_prob_global2=0.2)


def _images_per_cpu_second(process_one, jpegs: list[bytes], seconds: float) -> float:
    """Images per second of this process's CPU time: what one DataLoader worker on its own core
    achieves, and far less sensitive than wall time to other jobs sharing the machine."""
    process_one(jpegs[0])  # warm-up (lazy imports, table building)
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        process_one(jpegs[done % len(jpegs)])
        done += 1
    return done / (time.process_time() - start)


def _write_bench_shards(jpegs: list[bytes], folder: str, num_shards: int = 4) -> str:
    for shard in range(num_shards):
        with tarfile.open(os.path.join(folder, f"bench-{shard}.tar"), "w") as archive:
            for i in range(shard, len(jpegs), num_shards):
                for extension, data in (("jpg", jpegs[i]), ("cls", str(i % 10).encode())):
                    member = tarfile.TarInfo(f"img{i:05d}.{extension}")
                    member.size = len(data)
                    archive.addfile(member, io.BytesIO(data))
    return os.path.join(folder, f"bench-{{0..{num_shards - 1}}}.tar")


def _loader_images_per_s(jpegs: list[bytes], workers: int, seconds: float, num_locals: int) -> float:
    """End to end: shards -> shuffle -> decode -> multi-crop -> uint8 batches of 32, `workers`
    DataLoader workers (wall time: this one needs the machine to itself)."""
    from mokd_scale.data import build_train_loader
    with tempfile.TemporaryDirectory() as folder:
        data = types.SimpleNamespace(**vars(_dino_data_cfg(num_locals)), source="shards",
                                     train_shards=_write_bench_shards(jpegs, folder), workers=workers,
                                     shuffle_buffer=64, samples_per_epoch=1281167)
        recipe = types.SimpleNamespace(data=data, seed=0, train=types.SimpleNamespace(micro_batch_size=32,
                                                                                      global_batch_size=32))
        batches = iter(build_train_loader(recipe, rank=0, world_size=1))
        next(batches)  # worker start-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            done += next(batches)["label"].shape[0]
        rate = done / (time.perf_counter() - start)
        del batches  # stops the workers before their shards are deleted
        return rate


def run_data_bench(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="mokd-bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="number of distinct JPEGs")
    parser.add_argument("--seconds", type=float, default=8.0, help="CPU seconds per pipeline per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (noise on shared CPUs)")
    parser.add_argument("--locals", type=int, default=8, help="local crops per image")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="also time the whole shard loader with this many workers (0: skip)")
    parser.add_argument("--out", default="", help="write the JSON result here instead of stdout")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    jpegs = make_bench_jpegs(args.images)

    reference = reference_transform(num_locals=args.locals)
    ours = MultiCrop.from_config(_dino_data_cfg(args.locals))
    rng = random.Random(0)

    def run_reference(data):
        return reference(Image.open(io.BytesIO(data)).convert("RGB"))

    def run_ours(data):
        # Batch of one: include the uint8 stacking a worker does; normalisation happens on device.
        return stack_crops([ours(data, rng)])

    ref_rates, our_rates = [], []
    for _ in range(args.rounds):  # alternate so that load from other processes hits both alike
        ref_rates.append(_images_per_cpu_second(run_reference, jpegs, args.seconds))
        our_rates.append(_images_per_cpu_second(run_ours, jpegs, args.seconds))
    result = {
        "images": args.images, "local_crops": args.locals, "threads": 1, "clock": "process CPU time",
        "reference_images_per_s": round(max(ref_rates), 2),
        "ours_images_per_s": round(max(our_rates), 2),
    }
    result["speedup"] = round(result["ours_images_per_s"] / result["reference_images_per_s"], 2)
    result["rounds"] = {"reference": [round(r, 1) for r in ref_rates], "ours": [round(r, 1) for r in our_rates]}
    if args.loader_workers:
        rate = _loader_images_per_s(jpegs, args.loader_workers, args.seconds, args.locals)
        result[f"loader_{args.loader_workers}_workers_images_per_s"] = round(rate, 1)
    return result


def data_table(report: dict) -> str:
    line = (f"multi-crop images/s per worker (1 thread, {report['local_crops']} locals): torchvision reference "
            f"{report['reference_images_per_s']}, ours {report['ours_images_per_s']} ({report['speedup']}x)")
    loader = [f"{k}: {v}" for k, v in report.items() if k.startswith("loader_")]
    return "\n".join([line, *loader])
