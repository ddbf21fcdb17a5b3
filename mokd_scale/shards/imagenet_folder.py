"""ImageNet on disk: which files a split holds, which class each belongs to, and how
each becomes the RGB JPEG bytes a shard stores.

Layouts understood (ROOT = the --imagenet-root folder):
  ROOT/train/<wnid>/*.JPEG        training images, one folder per class
  ROOT/val/<wnid>/*.JPEG          validation sorted into class folders (valprep.sh layout), or
  ROOT/val/*.JPEG                 flat validation, labelled by the first source found of
    1. ROOT/LOC_val_solution.csv  (Kaggle; ImageId,PredictionString; first token = wnid)
    2. ILSVRC2012_validation_ground_truth.txt + meta.mat (devkit), each looked up in
       ROOT/ILSVRC2012_devkit_t12/data/ first, then in ROOT.
A val folder with at least one sub-folder is read as class folders.

Class index = position of the wnid in the sorted list of class folders under
ROOT/train (the torchvision ImageFolder convention), for train and val alike. The
devkit numbers classes differently (ILSVRC2012_ID), so its ids are translated to
wnids through meta.mat and never used as labels directly.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DEVKIT_DIR = Path("ILSVRC2012_devkit_t12") / "data"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
REENCODE_QUALITY = 95


class ImageNetLayoutError(Exception):
    """The tree cannot be read as asked; the message names the path and what to do."""


class UnreadableImage(Exception):
    """A file that cannot become a training image; str(self) is the reason recorded."""


@dataclasses.dataclass(frozen=True)
class SourceImage:
    relpath: str  # relative to ROOT, "/"-separated, e.g. "train/n01440764/n01440764_10.JPEG"
    wnid: str
    label: int


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    filename: str  # relative to ROOT
    reason: str


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _entries(folder: Path) -> list[tuple[str, bool]]:
    """(name, is a folder) of folder's entries, sorted. os.scandir knows the type without a
    stat() per file, which matters for 1.28 M files on a network file system."""
    with os.scandir(folder) as entries:
        return sorted((e.name, e.is_dir()) for e in entries)


def _subfolders(folder: Path) -> list[str]:
    return [name for name, is_dir in _entries(folder) if is_dir and not name.startswith(".")]


def train_classes(root: Path) -> list[str]:
    """Sorted wnids of ROOT/train's class folders: the label order of every split."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise ImageNetLayoutError(
            f"{train_dir} does not exist; the class list (label order) comes from the class folders "
            "of ROOT/train — point --imagenet-root at the folder holding train/ and val/")
    wnids = _subfolders(train_dir)
    if not wnids:
        raise ImageNetLayoutError(f"{train_dir} holds no class folders; expected {train_dir}/<wnid>/*.JPEG")
    return wnids


def list_split(root: Path, split: str, classes: list[str]) -> tuple[list[SourceImage], list[SkippedFile]]:
    """All images of a split with their labels, plus the files that will not be converted."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise ImageNetLayoutError(f"{split_dir} does not exist; expected ImageNet's {split}/ folder under {root}")
    if split == "val" and not _subfolders(split_dir):
        images, skipped = _list_flat_val(root, classes)
    else:
        images, skipped = _list_class_folders(root, split, classes)
    if not images:
        raise ImageNetLayoutError(f"{split_dir} holds no images (*.JPEG / *.jpg / *.png); nothing to convert")
    return sorted(images, key=lambda s: s.relpath), sorted(skipped, key=lambda s: s.filename)


def _list_class_folders(root: Path, split: str, classes: list[str]):
    label_of = {wnid: label for label, wnid in enumerate(classes)}
    images, skipped = [], []
    for name, is_dir in _entries(root / split):
        rel = f"{split}/{name}"
        if not is_dir:
            skipped.append(SkippedFile(rel, "stray file: not inside a class folder"))
        elif not name.startswith("."):
            if name not in label_of:
                raise ImageNetLayoutError(
                    f"class folder {root / rel} is not among the {len(classes)} train classes; "
                    "train and val must have the same wnid folders")
            images_in, skipped_in = _list_class_folder(root / rel, rel, name, label_of[name])
            images += images_in
            skipped += skipped_in
    return images, skipped


def _list_class_folder(folder: Path, rel: str, wnid: str, label: int):
    images, skipped = [], []
    for entry_name, is_dir in _entries(folder):
        name = f"{rel}/{entry_name}"
        if is_dir:
            skipped.append(SkippedFile(name, "stray directory inside a class folder"))
        elif is_image_name(entry_name):
            images.append(SourceImage(name, wnid, label))
        else:
            skipped.append(SkippedFile(name, "stray file: not an image extension (.JPEG/.jpg/.png)"))
    return images, skipped


def _list_flat_val(root: Path, classes: list[str]):
    source, wnid_of_stem = read_val_labels(root)
    label_of = {wnid: label for label, wnid in enumerate(classes)}
    unknown = sorted(set(wnid_of_stem.values()) - set(label_of))
    if unknown:
        raise ImageNetLayoutError(
            f"{source} names wnids that are not train classes (e.g. {unknown[:3]}); "
            f"the class list has {len(classes)} wnids — is ROOT/train complete?")
    images, skipped = [], []
    for entry_name, _ in _entries(root / "val"):
        name = f"val/{entry_name}"
        stem = entry_name.split(".")[0]
        if not is_image_name(entry_name):
            skipped.append(SkippedFile(name, "stray file: not an image extension (.JPEG/.jpg/.png)"))
        elif stem not in wnid_of_stem:
            skipped.append(SkippedFile(name, f"no label for {stem} in {source}"))
        else:
            wnid = wnid_of_stem[stem]
            images.append(SourceImage(name, wnid, label_of[wnid]))
    return images, skipped


def _first_existing(root: Path, name: str) -> Path | None:
    for candidate in (root / DEVKIT_DIR / name, root / name):
        if candidate.is_file():
            return candidate
    return None


def read_val_labels(root: Path) -> tuple[Path, dict[str, str]]:
    """(label source, {file stem: wnid}) for a flat val folder."""
    csv_path = root / KAGGLE_VAL_CSV
    if csv_path.is_file():
        return csv_path, read_kaggle_val_csv(csv_path)
    truth, meta = _first_existing(root, DEVKIT_GROUND_TRUTH), _first_existing(root, DEVKIT_META)
    if truth and meta:
        return truth, read_devkit_val_labels(truth, meta)
    raise ImageNetLayoutError(
        f"{root / 'val'} holds images but no class folders, and no label source was found: looked for "
        f"{csv_path}, and for {DEVKIT_GROUND_TRUTH} + {DEVKIT_META} in {root / DEVKIT_DIR} and {root}. "
        "Provide one of them, or sort val into class folders val/<wnid>/")


def read_kaggle_val_csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        if not rows.fieldnames or not {"ImageId", "PredictionString"} <= set(rows.fieldnames):
            raise ImageNetLayoutError(f"{path} must have the columns ImageId,PredictionString")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows if row["PredictionString"]}


def read_devkit_val_labels(truth_path: Path, meta_path: Path) -> dict[str, str]:
    """Line i of the ground truth holds the ILSVRC2012_ID of ILSVRC2012_val_{i:08d}."""
    wnid_of_id = read_devkit_synsets(meta_path)
    labels = {}
    for line_number, line in enumerate(truth_path.read_text().split(), start=1):
        ilsvrc_id = int(line)
        if ilsvrc_id not in wnid_of_id:
            raise ImageNetLayoutError(f"{truth_path} line {line_number}: id {ilsvrc_id} is not in {meta_path}")
        labels[f"ILSVRC2012_val_{line_number:08d}"] = wnid_of_id[ilsvrc_id]
    return labels


def read_devkit_synsets(meta_path: Path) -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} from the devkit's meta.mat (ids are not in sorted-wnid order)."""
    import numpy as np
    import scipy.io  # lazily: only the devkit layout needs it

    try:
        synsets = scipy.io.loadmat(str(meta_path), squeeze_me=True)["synsets"]
    except (OSError, ValueError, KeyError) as err:
        raise ImageNetLayoutError(f"{meta_path} cannot be read as the devkit's meta.mat ({err})") from err
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets)}


def read_image_file(root: Path, relpath: str) -> bytes:
    try:
        return (root / relpath).read_bytes()
    except OSError as err:
        raise UnreadableImage(f"cannot read file: {err.strerror or err}") from err


def to_rgb_jpeg(data: bytes, resize_short_side: int = 0) -> tuple[bytes, str | None]:
    """(JPEG bytes, why they were re-encoded, or None when the original bytes are kept).

    Decoding the whole image (load()) is what catches truncated files; an RGB JPEG
    that needs no resize keeps its original bytes so no quality is lost.
    """
    if not data:
        raise UnreadableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            reasons = _reencode_reasons(img, resize_short_side)
            if not reasons:
                return data, None
            rgb = _shrink(_as_rgb(img), resize_short_side)
    except Image.UnidentifiedImageError as err:
        raise UnreadableImage("not an image: no decoder recognises it") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise UnreadableImage(f"truncated or corrupt image: {err}") from err
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue(), ", ".join(reasons)


def _reencode_reasons(img: Image.Image, resize_short_side: int) -> list[str]:
    reasons = []
    if img.format != "JPEG":
        reasons.append(f"{img.format} file")
    if img.mode != "RGB":
        reasons.append(f"mode {img.mode}")
    if 0 < resize_short_side < min(img.size):
        reasons.append(f"resized from {img.size[0]}x{img.size[1]}")
    return reasons


def _as_rgb(img: Image.Image) -> Image.Image:
    # Transparent pixels go on white, not on whatever colour hides under alpha 0.
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _shrink(img: Image.Image, short_side: int) -> Image.Image:
    width, height = img.size
    if short_side <= 0 or min(width, height) <= short_side:
        return img
    scale = short_side / min(width, height)
    size = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)
