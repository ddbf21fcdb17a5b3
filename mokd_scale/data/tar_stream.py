"""Stream samples out of tar shards (the WebDataset layout) without unpacking them.

A sample is the run of adjacent members sharing a key: "n01440764_10026.jpg", "n01440764_10026.cls",
... -> {"__key__": "n01440764_10026", "__offset__": 512, "jpg": b"...", "cls": b"0"}. The key is the
basename up to its first dot, as WebDataset defines it; the offset is where the sample starts in the
tar, so that a resumed training stream can read its buffered samples again directly. Any URL
webdataset's gopen understands works (files, pipe:, http).
"""
from __future__ import annotations

import logging
import os
import tarfile
from typing import Iterator

from webdataset.gopen import gopen

from mokd_scale.data.shard_spec import is_remote

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class CorruptSample(Exception):
    """A sample that cannot be used (no image, bad label, undecodable bytes)."""


def _split_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    key, _, extension = base.partition(".")
    return os.path.join(folder, key) if folder else key, extension.lower()


OFFSET = "__offset__"  # where the sample's first member header starts in its tar file


def read_shard(url: str, start: int = 0) -> Iterator[dict]:
    """Yield the samples of one shard in order, from byte `start` (a sample's OFFSET; seekable shards
    only). Raises OSError/tarfile errors on unreadable data; the caller decides whether that is fatal
    (eval) or skipped (training)."""
    with gopen(url, "rb") as stream:
        if start:
            stream.seek(start)
        yield from _samples_in(stream, start)


def seekable(url: str) -> bool:
    """An uncompressed tar file on a filesystem: samples can be read at their offsets."""
    return url.endswith(".tar") and not is_remote(url) and os.path.isfile(url)


def read_samples_at(url: str, offsets) -> dict[int, dict]:
    """The samples of a seekable shard that start at the given offsets (one open, one seek each)."""
    found = {}
    with open(url, "rb") as handle:
        for offset in sorted(set(offsets)):
            handle.seek(offset)
            sample = next(_samples_in(handle, offset), None)
            if sample is not None and sample[OFFSET] == offset:
                found[offset] = sample
    return found


def _samples_in(stream, base: int) -> Iterator[dict]:
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        sample: dict = {}
        for member in archive:
            if not member.isfile():
                continue
            key, extension = _split_name(member.name)
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            if not sample:
                sample = {"__key__": key, OFFSET: base + member.offset}
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
