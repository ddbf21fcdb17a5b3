"""A small ImageNet-shaped folder tree built from real photos shipped with scikit-image.

    from tests.imagenet_fixture import make_imagenet_root, read_fixture_manifest
    root = make_imagenet_root(tmp_path, n_classes=3, per_class=6, val_layout="folders")

Stable interface (other tests import it):
- make_imagenet_root(tmp_path, n_classes=3, per_class=6, val_layout="folders") -> Path of ROOT
  (= tmp_path / "imagenet"); n_classes >= 1 (ImageNet's first wnids, made-up ones past 20),
  per_class >= 4. ROOT holds
    ROOT/train/<wnid>/  per_class readable images per class, ~200-400 px, crops/flips/resizes
                        of real photos (astronaut, coffee, chelsea, rocket, camera, ...);
    ROOT/val/           max(2, per_class // 2) readable images per class, named
                        ILSVRC2012_val_00000001.JPEG ..., laid out as val_layout says:
      "folders": ROOT/val/<wnid>/*.JPEG
      "csv":     ROOT/val/*.JPEG + ROOT/LOC_val_solution.csv
      "devkit":  ROOT/val/*.JPEG + ROOT/ILSVRC2012_devkit_t12/data/
                 {ILSVRC2012_validation_ground_truth.txt, meta.mat}; meta.mat's ILSVRC2012_IDs
                 are deliberately NOT in sorted-wnid order (see devkit_ids).
  ImageNet's quirks, in train class 0 (among its per_class readable images, needs per_class >= 4):
  a PNG named .JPEG, a CMYK JPEG, a grayscale JPEG, a name with dots (<wnid>_13.extra.JPEG);
  and in addition to them: a truncated JPEG, an empty .JPEG, a README.txt in the class folder.
  Val adds a grayscale JPEG (among the readable) and one truncated JPEG (extra, labelled).
- read_fixture_manifest(root) -> dict, from ROOT/FIXTURE.json: {"classes": [wnids sorted],
  "train": [...], "val": [...]}, each entry {"filename" (relative to ROOT, as in the val_layout),
  "wnid", "label" (index in classes), "kind"}; kind is one of rgb, png, cmyk, gray, dotted
  (readable: they must come out of a converter) or truncated, empty, stray (must be skipped).
- devkit_ids(classes) -> {wnid: ILSVRC2012_ID} as written to the fixture's meta.mat.
Deterministic (same arguments -> same bytes) and fast (~0.15 s for the defaults).
"""
from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageOps

# ImageNet's first 20 wnids (in sorted order), so paths look like the real thing.
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041",
         "n01514668", "n01514859", "n01518878", "n01530575", "n01531178", "n01532829", "n01534433",
         "n01537544", "n01558993", "n01560419", "n01580077", "n01582220", "n01592084")
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png",
          "hubble_deep_field.jpg", "ihc.png", "brick.png", "grass.png", "coins.png")
READABLE_KINDS = ("rgb", "png", "cmyk", "gray", "dotted")
SKIPPED_KINDS = ("truncated", "empty", "stray")
VAL_LAYOUTS = ("folders", "csv", "devkit")
MANIFEST = "FIXTURE.json"


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    # Opened with PIL straight from skimage's data folder: skimage.data.<name>() would
    # import an I/O plugin first (~0.6 s).
    with Image.open(Path(skimage.data.__file__).parent / name) as img:
        return img.convert("RGB")


def _variant(index: int) -> Image.Image:
    """The index-th distinct picture: a photo, cropped, maybe mirrored, resized to 200-400 px."""
    photo = _photo(PHOTOS[index % len(PHOTOS)])
    rng = np.random.default_rng(index)
    width, height = photo.size
    crop_w, crop_h = (int(d * rng.uniform(0.6, 1.0)) for d in (width, height))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    img = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    short_side = int(rng.integers(200, 320))
    scale = short_side / min(img.size)
    return img.resize((min(400, round(img.width * scale)), min(400, round(img.height * scale))))


def _encode(img: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    if kind == "png":
        img.save(out, format="PNG")
    elif kind == "cmyk":
        img.convert("CMYK").save(out, format="JPEG", quality=90)
    elif kind == "gray":
        img.convert("L").save(out, format="JPEG", quality=90)
    else:
        img.save(out, format="JPEG", quality=90)
    data = out.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


def _file_bytes(kind: str, index: int) -> bytes:
    if kind == "empty":
        return b""
    if kind == "stray":
        return b"Notes about this class folder; not an image.\n"
    return _encode(_variant(index), kind)


def _train_entries(classes: list[str], per_class: int) -> list[dict]:
    quirks = ("png", "cmyk", "gray", "dotted")
    entries = []
    for label, wnid in enumerate(classes):
        kinds = [quirks[i] if label == 0 and i < len(quirks) else "rgb" for i in range(per_class)]
        if label == 0:
            kinds += list(SKIPPED_KINDS)
        for number, kind in enumerate(kinds, start=10):
            special_names = {"dotted": f"{wnid}_{number}.extra.JPEG", "stray": "README.txt"}
            name = special_names.get(kind, f"{wnid}_{number}.JPEG")
            entries.append({"filename": f"train/{wnid}/{name}", "wnid": wnid, "label": label, "kind": kind})
    return entries


def _val_entries(classes: list[str], per_class: int, layout: str) -> list[dict]:
    per_val = max(2, per_class // 2)
    # Classes interleaved, as in the real val set; the first image is grayscale, the last truncated.
    labels = [label for _ in range(per_val) for label in range(len(classes))] + [len(classes) - 1]
    entries = []
    for number, label in enumerate(labels, start=1):
        kind = "gray" if number == 1 else "truncated" if number == len(labels) else "rgb"
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        folder = f"val/{classes[label]}" if layout == "folders" else "val"
        entries.append({"filename": f"{folder}/{name}", "wnid": classes[label], "label": label, "kind": kind})
    return entries


def _write_kaggle_csv(root: Path, val: list[dict]) -> None:
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for entry in reversed(val):  # the real file is not in file-name order either
            boxes = f"{entry['wnid']} 10 20 150 180 {entry['wnid']} 5 5 90 90"  # wnid xmin ymin xmax ymax, twice
            writer.writerow([Path(entry["filename"]).stem, boxes])


def class_wnids(n_classes: int) -> list[str]:
    """Sorted wnids: ImageNet's first 20, then made-up ones that sort after them."""
    return list(WNIDS[:n_classes]) + [f"n0990{i:04d}" for i in range(n_classes - len(WNIDS))]


def devkit_ids(classes: list[str]) -> dict[str, int]:
    """wnid -> ILSVRC2012_ID used by the fixture's meta.mat: reversed, so not sorted-wnid order."""
    return {wnid: len(classes) - label for label, wnid in enumerate(classes)}


def _write_devkit(root: Path, classes: list[str], val: list[dict]) -> None:
    import scipy.io

    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    ids = devkit_ids(classes)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[e['wnid']]}\n" for e in val))
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    # Leaf synsets first, then a non-leaf one, ordered by id like the real file.
    rows = sorted((ids[w], w, f"class {w}", 0) for w in classes)
    rows.append((len(classes) + 1, "n00001740", "entity", len(classes)))
    synsets = np.array(rows, dtype=fields).reshape(-1, 1)
    scipy.io.savemat(str(data / "meta.mat"), {"synsets": synsets})


def make_imagenet_root(tmp_path, n_classes: int = 3, per_class: int = 6, val_layout: str = "folders") -> Path:
    """Build ROOT = tmp_path/"imagenet" (see the module docstring) and return it."""
    if val_layout not in VAL_LAYOUTS:
        raise ValueError(f"val_layout must be one of {VAL_LAYOUTS}, got {val_layout!r}")
    if n_classes < 1 or per_class < 4:
        raise ValueError(f"need n_classes >= 1 and per_class >= 4 (class 0 holds 4 quirks); "
                         f"got n_classes={n_classes}, per_class={per_class}")
    root = Path(tmp_path) / "imagenet"
    classes = class_wnids(n_classes)
    train, val = _train_entries(classes, per_class), _val_entries(classes, per_class, val_layout)
    for index, entry in enumerate(train + val):
        path = root / entry["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_file_bytes(entry["kind"], index))
    if val_layout == "csv":
        _write_kaggle_csv(root, val)
    elif val_layout == "devkit":
        _write_devkit(root, classes, val)
    manifest = {"classes": classes, "train": train, "val": val}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return root


def read_fixture_manifest(root) -> dict:
    return json.loads((Path(root) / MANIFEST).read_text())
