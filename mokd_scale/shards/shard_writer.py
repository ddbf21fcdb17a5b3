"""Write one WebDataset shard deterministically and atomically, plus its completion record.

Deterministic: tar headers carry a fixed mtime/uid/gid/uname/gname/mode and members
are written in a fixed order, so the same plan gives byte-identical tars on every run
and machine (webdataset's TarWriter stamps the current time instead).
Atomic: a shard is written to a hidden temporary name in the same folder and renamed
when complete; only then is its completion record ("sidecar") written, also by rename.
A tar without a sidecar is therefore treated as unfinished and rewritten — which gives
the same bytes — so a kill at any point leaves nothing that a rerun would trust wrongly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

from mokd_scale.shards.imagenet_folder import UnreadableImage, read_image_file, to_rgb_jpeg

FIXED_MTIME = 0
FILE_MODE = 0o644


@dataclasses.dataclass(frozen=True)
class PlannedSample:
    key: str  # unique within the split, no dots (webdataset cuts keys at the first dot)
    relpath: str
    wnid: str
    label: int


@dataclasses.dataclass(frozen=True)
class ShardTask:
    tar_path: str
    sidecar_path: str
    root: str
    samples: tuple[PlannedSample, ...]
    resize_short_side: int
    plan_sha256: str


class _HashingWriter:
    """File wrapper that hashes and counts what is written, so a shard is not re-read."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.size


def _member_header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, FIXED_MTIME, FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def temporary_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def write_tar_atomically(path: Path, members: Iterable[tuple[str, bytes]]) -> tuple[int, str]:
    """Write members (name, bytes) as a tar at path via temp file + rename; returns (size, sha256)."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as file:
            writer = _HashingWriter(file)
            with tarfile.open(fileobj=writer, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for name, data in members:
                    tar.addfile(_member_header(name, len(data)), io.BytesIO(data))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename reaches the disk before the sidecar that vouches for it
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return writer.size, writer.sha256.hexdigest()


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some network file systems cannot fsync a folder; the rename still happened
    finally:
        os.close(descriptor)


def write_json_atomically(path: Path, obj) -> None:
    tmp = temporary_name(path)
    try:
        with open(tmp, "w") as file:
            json.dump(obj, file, indent=1, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sample_members(sample: PlannedSample, jpeg: bytes, reencoded: str | None):
    meta = {"filename": sample.relpath, "wnid": sample.wnid, "label": sample.label, "reencoded": reencoded}
    yield f"{sample.key}.cls", str(sample.label).encode("ascii")
    yield f"{sample.key}.jpg", jpeg
    yield f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")


def convert_shard(task: ShardTask, on_image: Callable[[], None] = lambda: None) -> dict:
    """Read, validate and encode the shard's images, write the tar, then its sidecar.

    Returns the sidecar record: url, nsamples, filesize, sha256, plan_sha256 and the
    files skipped / re-encoded (with reasons). A skipped file makes this shard one
    sample shorter than planned; nothing else changes.
    """
    root = Path(task.root)
    skipped, reencoded = [], []

    def members():
        for sample in task.samples:
            try:
                jpeg, why = to_rgb_jpeg(read_image_file(root, sample.relpath), task.resize_short_side)
            except UnreadableImage as err:
                skipped.append({"filename": sample.relpath, "reason": str(err)})
            else:
                if why:
                    reencoded.append({"filename": sample.relpath, "reason": why})
                yield from _sample_members(sample, jpeg, why)
            on_image()

    tar_path = Path(task.tar_path)
    size, sha256 = write_tar_atomically(tar_path, members())
    record = {"url": tar_path.name, "nsamples": len(task.samples) - len(skipped), "filesize": size,
              "sha256": sha256, "plan_sha256": task.plan_sha256, "skipped": skipped, "reencoded": reencoded}
    write_json_atomically(Path(task.sidecar_path), record)
    return record


# Pool workers report each finished image through a shared counter, so the progress
# line moves while a (1000-image) shard is still being written.
_images_done = None


def init_pool_worker(images_done) -> None:
    global _images_done
    _images_done = images_done
    os.environ["OMP_NUM_THREADS"] = "1"


def _count_image() -> None:
    with _images_done.get_lock():
        _images_done.value += 1


def convert_shard_in_pool(task: ShardTask) -> dict:
    return convert_shard(task, _count_image)
