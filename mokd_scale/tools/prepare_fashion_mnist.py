"""Turn Fashion-MNIST (Debian's dataset-fashion-mnist package) into an ImageNet-shaped folder.

    ROOT/train/n0000000X/fmnist_train_000123.JPEG   (10 class folders, names shaped like WordNet ids)
    ROOT/val/n0000000X/fmnist_val_000045.JPEG
    ROOT/classes.txt                                 "n00000000 T-shirt/top" per line

so that mokd-shards treats it exactly like ImageNet. Images are 3-channel JPEGs
(the backbones expect RGB), optionally upscaled. A subset per class keeps the CPU demo fast.

    mokd-fashion-mnist --out demo_out/fashion_mnist \
        --train-per-class 500 --val-per-class 100 --size 32
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
PREPARED_MARKER = ".prepared"  # in the output folder: the settings it was written with
APT_HINT = "apt-get install -y dataset-fashion-mnist   (as root, or with sudo)"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# split name in our layout -> file prefix in the Debian package
SPLIT_FILES = {"train": "train", "val": "t10k"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip or plain): 2 zero bytes, type code, rank, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but "
                         f"{len(raw) - header} data bytes follow; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def wnid(label: int) -> str:
    """Class folder name shaped like an ImageNet WordNet id."""
    return f"n{label:08d}"


def find_split_files(source: Path, split: str) -> tuple[Path, Path]:
    prefix = SPLIT_FILES[split]
    images = source / f"{prefix}-images-idx3-ubyte.gz"
    labels = source / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (images, labels):
        if not path.exists():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found. Install the Debian package with\n"
                f"    {APT_HINT}\nor pass --source DIR holding the four *-ubyte.gz files.")
    return images, labels


def choose_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` samples of each class (all if 0), seeded, in file order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if per_class and per_class < len(members):
            members = np.sort(rng.choice(members, per_class, replace=False))
        chosen.append(members)
    return np.sort(np.concatenate(chosen))


def save_split(images: np.ndarray, labels: np.ndarray, chosen: np.ndarray, out_dir: Path,
               split: str, size: int, quality: int) -> int:
    for label in np.unique(labels[chosen]):
        (out_dir / wnid(int(label))).mkdir(parents=True, exist_ok=True)
    for i in chosen:
        image = Image.fromarray(np.ascontiguousarray(images[i], dtype=np.uint8)).convert("RGB")
        if size and size != image.width:
            image = image.resize((size, size), Image.BICUBIC)
        target = out_dir / wnid(int(labels[i])) / f"fmnist_{split}_{i:06d}.JPEG"
        image.save(target, format="JPEG", quality=quality)
    return len(chosen)


def prepare(source: Path, out: Path, train_per_class: int, val_per_class: int,
            size: int = 0, seed: int = 0, quality: int = 95) -> dict[str, int]:
    """Write the ImageNet-shaped folder; returns images written per split.

    A finished folder (marker file present, same settings) is reused as is.
    """
    settings = f"train_per_class={train_per_class} val_per_class={val_per_class} size={size} seed={seed}\n"
    marker = out / PREPARED_MARKER
    if marker.exists() and marker.read_text() == settings:
        return {split: sum(1 for _ in (out / split).rglob("*.JPEG")) for split in SPLIT_FILES}
    for split in SPLIT_FILES:  # stale images of other settings would mix into the shards
        shutil.rmtree(out / split, ignore_errors=True)
    written = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        image_file, label_file = find_split_files(source, split)
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"{image_file}/{label_file}: expected (n, h, w) images and (n,) labels, "
                             f"got {images.shape} and {labels.shape}")
        chosen = choose_per_class(labels, per_class, seed)
        written[split] = save_split(images, labels, chosen, out / split, split, size, quality)
    (out / "classes.txt").write_text(
        "".join(f"{wnid(i)} {name}\n" for i, name in enumerate(CLASS_NAMES)))
    marker.write_text(settings)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output ROOT (gets train/ and val/)")
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR,
                        help=f"folder with the *-idx?-ubyte.gz files (default: {DEBIAN_DIR})")
    parser.add_argument("--train-per-class", type=int, default=0, help="train images per class (0 = all 6000)")
    parser.add_argument("--val-per-class", type=int, default=0, help="val images per class (0 = all 1000)")
    parser.add_argument("--size", type=int, default=0,
                        help="resize the 28 px images to SIZE px (bicubic; 0 = keep 28)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class subset")
    args = parser.parse_args(argv)
    try:
        written = prepare(args.source, args.out, args.train_per_class, args.val_per_class,
                          args.size, args.seed)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {written['train']} train, {written['val']} val images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
