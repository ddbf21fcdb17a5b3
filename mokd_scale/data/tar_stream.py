"""Stream samples out of tar shards (the WebDataset layout) without unpacking them.

A sample is the run of adjacent members sharing a key: "n01440764_10026.jpg", "n01440764_10026.cls",
... -> {"__key__": "n01440764_10026", "jpg": b"...", "cls": b"0"}. The key is the basename up to its
first dot, as WebDataset defines it. Any URL webdataset's gopen understands works (files, pipe:, http).
"""
from __future__ import annotations

import logging
import os
import tarfile
from typing import Iterator

from webdataset.gopen import gopen

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class CorruptSample(Exception):
    """A sample that cannot be used (no image, bad label, undecodable bytes)."""


def _split_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    key, _, extension = base.partition(".")
    return os.path.join(folder, key) if folder else key, extension.lower()


def read_shard(url: str) -> Iterator[dict]:
    """Yield the samples of one shard in order. Raises OSError/tarfile errors on unreadable data;
    the caller decides whether that is fatal (eval) or skipped (training)."""
    with gopen(url, "rb") as stream:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            sample: dict = {}
            for member in archive:
                if not member.isfile():
                    continue
                key, extension = _split_name(member.name)
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample[extension] = archive.extractfile(member).read()
            if sample:
                yield sample


def image_bytes(sample: dict) -> bytes:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    raise CorruptSample(f"sample {sample.get('__key__')!r} has no image member {IMAGE_EXTENSIONS}")


def label_of(sample: dict) -> int:
    """The class index from the `cls` member (ASCII int); -1 when the shard carries no labels."""
    if "cls" not in sample:
        return -1
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptSample(f"sample {sample.get('__key__')!r} has a bad cls {sample['cls'][:20]!r}") from err
