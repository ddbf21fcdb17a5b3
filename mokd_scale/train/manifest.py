"""A checkpoint tag's inventory: every file with its size, and a sha256 of MOKD's own state files.

manifest.json is written into the tag after every rank's files are on disk and before `latest` moves,
so a tag without one is an interrupted save. verify() compares a tag with its manifest: a file missing
or of another size (a disk that filled up, a cleanup script, a copy cut short) or a state file whose
checksum changed makes the tag untrusted. Files added later (a copy converted by hand, say) are
allowed. The engines' large files get sizes only: hashing gigabytes at every
save and resume would cost more than the damage it finds beyond truncation.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
TEMPORARY_MARK = ".tmp-"  # files being written (atomic saves) are not part of a tag


def list_files(tag_dir: Path) -> dict[str, int]:
    """Relative path -> size of every file under tag_dir, as this process sees them."""
    files = {}
    for folder, _, names in os.walk(tag_dir):
        for name in names:
            path = Path(folder) / name
            relative = path.relative_to(tag_dir).as_posix()
            if relative == MANIFEST or TEMPORARY_MARK in name:
                continue
            try:
                files[relative] = path.stat().st_size
            except FileNotFoundError:  # removed between listing and stat (a concurrent prune)
                pass
    return files


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(tag_dir: Path, step: int, sizes: dict[str, int], digests: dict[str, str]) -> None:
    files = {name: {"size": size, **({"sha256": digests[name]} if name in digests else {})}
             for name, size in sorted(sizes.items())}
    write_text_atomically(tag_dir / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))


def write_text_atomically(path: Path, text: str) -> None:
    """A reader sees the old content or the new, never a torn file."""
    tmp = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_manifest(tag_dir: Path) -> dict:
    """The manifest's files, or ValueError saying why the tag has none to trust."""
    path = tag_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST} (the save did not finish, or a mokd_scale without manifests wrote it)")
    try:
        manifest = json.loads(path.read_text())
        return dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{MANIFEST} is unreadable ({error})") from error


def verify(tag_dir: Path) -> list[str]:
    """What is wrong with the tag: [] when every file it was written with is there, whole."""
    try:
        files = read_manifest(tag_dir)
    except ValueError as error:
        return [str(error)]
    problems = []
    for name, entry in files.items():
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{name} has {size} bytes, {entry.get('size')} when written (truncated or replaced)")
        elif "sha256" in entry and sha256_of(path) != entry["sha256"]:
            problems.append(f"{name} does not match its checksum (changed since it was written)")
    return problems


def total_bytes(tag_dir: Path) -> int:
    """Bytes a tag took when written (0 when unknown): how much room the next save needs."""
    try:
        return sum(int(entry.get("size", 0)) for entry in read_manifest(tag_dir).values())
    except ValueError:
        return 0
