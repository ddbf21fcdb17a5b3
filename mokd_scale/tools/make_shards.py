#!/usr/bin/env python
"""Convert an ImageNet folder tree into WebDataset tar shards plus a wids-style index.

  mokd-shards --imagenet-root /data/imagenet --split train --out /data/shards
  mokd-shards --imagenet-root /data/imagenet --split val --out /data/shards

writes OUT/imagenet-{split}-000000.tar ... and OUT/imagenet-{split}.json. Each sample
holds KEY.jpg (the original bytes of an RGB JPEG, else an RGB JPEG re-encoded at
quality 95), KEY.cls (the label in ASCII) and KEY.json (filename, wnid, label,
reencoded). Labels: position of the wnid among the sorted class folders of
ROOT/train; to convert val without ROOT/train, convert train into the same OUT first
(its index carries the class list).

Val may be sorted into class folders (ROOT/val/<wnid>/) or flat (ROOT/val/*.JPEG). Flat
val is labelled by ROOT/LOC_val_solution.csv if present, else by the devkit's
ILSVRC2012_validation_ground_truth.txt + meta.mat, both looked up in
ROOT/ILSVRC2012_devkit_t12/data/ and then ROOT (devkit ids go through meta.mat's wnids).
Unreadable files (empty, truncated, not an image) and stray files (README.txt...) are
skipped and listed with the reason in the index and the summary.

Samples are shuffled with --seed and dealt into ceil(N / --samples-per-shard) shards
whose planned sizes differ by at most one. A file that turns out unreadable while its
shard is written (truncated, not an image) is skipped, so that shard is one shorter.
Same input + same options -> byte-identical shards, whatever --workers is.

Interrupted? Rerun the same command: finished shards (tar + completion record in
OUT/.imagenet-{split}.state/) are kept, the rest are redone. Rerunning with another
seed, shard size, limit, resize or input against the same OUT is refused, because
the old and new shards would mix; use a fresh --out or delete the old files.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from mokd_scale.shards.imagenet_folder import ImageNetLayoutError, SourceImage, list_split, train_classes
from mokd_scale.shards.shard_writer import (
    PlannedSample, ShardTask, convert_shard, convert_shard_in_pool, init_pool_worker, write_json_atomically)

PLAN_FORMAT = 1  # bump when the bytes of a shard would change for the same plan
PLAN_SETTINGS = ("split", "seed", "samples_per_shard", "limit", "resize_short_side")
SUMMARY_MAX_SKIPPED = 50


class UsageError(Exception):
    """Bad input or an OUT that would mix plans; the message says what to do."""


def parse_args(argv=None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet-root", required=True, type=Path,
                        help="folder holding train/<wnid>/*.JPEG and val/ (class folders or flat + labels)")
    parser.add_argument("--split", required=True, choices=("train", "val"))
    parser.add_argument("--out", required=True, type=Path, help="output folder for shards and index")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="target samples per shard (~110 MB at ImageNet's mean JPEG size)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding/encoding in parallel, one shard each at a time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle before sharding")
    parser.add_argument("--resize-short-side", type=int, default=0,
                        help="if > 0, shrink images whose short side exceeds this (keeps aspect)")
    parser.add_argument("--limit", type=int, default=0,
                        help="if > 0, convert only this many images (a random subset, for trials)")
    args = parser.parse_args(argv)
    for name in ("samples_per_shard", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("resize_short_side", "limit"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (off) or positive")
    return args


# ---------------------------------------------------------------- planning

def resolve_classes(root: Path, split: str, out: Path) -> list[str]:
    """Label order: ROOT/train's class folders, else the train index already in OUT."""
    if not root.is_dir() or not any(root.iterdir()):
        raise UsageError(f"ImageNet root {root} is missing or empty; pass --imagenet-root pointing at "
                         "the folder that holds train/<wnid>/ and val/")
    train_index = out / "imagenet-train.json"
    if split == "val" and not (root / "train").is_dir() and train_index.is_file():
        return json.loads(train_index.read_text())["classes"]
    try:
        classes = train_classes(root)
    except ImageNetLayoutError as err:
        raise UsageError(f"{err} (for val without ROOT/train, convert train into {out} first: "
                         "its index holds the class list)") from err
    if train_index.is_file() and json.loads(train_index.read_text())["classes"] != classes:
        raise UsageError(f"{train_index} lists other classes than {root / 'train'}; labels would disagree "
                         "between splits — use a fresh --out")
    return classes


def safe_keys(images: list[SourceImage]) -> list[str]:
    """File stems without dots or odd characters, made unique in listing order."""
    keys, taken = [], set()
    for image in images:
        stem = Path(image.relpath).name.rsplit(".", 1)[0]
        base = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
        key, copy = base, 1
        while key in taken:
            copy += 1
            key = f"{base}_{copy}"
        taken.add(key)
        keys.append(key)
    return keys


def shuffled(samples: list[PlannedSample], seed: int) -> list[PlannedSample]:
    # Sorting by a keyed hash is a seeded shuffle that no Python/numpy version can change.
    return sorted(samples, key=lambda s: hashlib.sha256(f"{seed}\0{s.relpath}".encode()).digest())


def balanced_sizes(total: int, per_shard: int) -> list[int]:
    """ceil(total / per_shard) shard sizes that differ by at most one (no tiny last shard)."""
    num_shards = math.ceil(total / per_shard)
    base, extra = divmod(total, num_shards)
    return [base + 1] * extra + [base] * (num_shards - extra)


def make_plan(images: list[SourceImage], classes: list[str], args) -> tuple[list[list[PlannedSample]], str]:
    """(samples of each shard, sha256 fingerprint of the whole plan and its settings)."""
    samples = [PlannedSample(key, im.relpath, im.wnid, im.label) for key, im in zip(safe_keys(images), images)]
    samples = shuffled(samples, args.seed)[: args.limit or None]
    shards, start = [], 0
    for size in balanced_sizes(len(samples), args.samples_per_shard):
        shards.append(samples[start:start + size])
        start += size
    digest = hashlib.sha256(json.dumps([PLAN_FORMAT, plan_settings(args), classes]).encode())
    for number, shard in enumerate(shards):
        for s in shard:
            digest.update(f"{number}\t{s.key}\t{s.relpath}\t{s.label}\n".encode())
    return shards, digest.hexdigest()


def plan_settings(args) -> dict:
    return {name: getattr(args, name) for name in PLAN_SETTINGS}


# ---------------------------------------------------------------- the output folder

class OutputFolder:
    """OUT's files for one split: shards, index, and the hidden state (plan, per-shard records)."""

    def __init__(self, out: Path, split: str):
        self.out, self.name = out, f"imagenet-{split}"
        self.state = out / f".{self.name}.state"
        self.plan_file = self.state / "plan.json"
        self.index = out / f"{self.name}.json"

    def tar(self, number: int) -> Path:
        return self.out / f"{self.name}-{number:06d}.tar"

    def sidecar(self, number: int) -> Path:
        return self.state / f"{self.name}-{number:06d}.json"

    def check_compatible(self, plan_sha256: str, settings: dict) -> None:
        """Refuse (before writing anything) to add shards of a new plan to an old one."""
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} exists and is not a folder")
        if self.plan_file.is_file():
            old = json.loads(self.plan_file.read_text())
            if old["plan_sha256"] == plan_sha256:
                return
            changed = [f"{k}: {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
            raise UsageError(
                f"{self.out} already holds {self.name} shards of another plan "
                f"({', '.join(changed) or 'the input files or classes changed'}); mixing them would corrupt "
                f"the dataset. Use a fresh --out, or delete {self.out}/{self.name}-*.tar, {self.index} "
                f"and {self.state} to start over")
        elif self.index.exists() or any(self.out.glob(f"{self.name}-*.tar")):
            raise UsageError(f"{self.out} holds {self.name} shards but no plan record ({self.plan_file}), so "
                             "it cannot tell whether they match this run; use a fresh --out or delete them")

    def prepare(self, plan_sha256: str, record: dict) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock()
        if not self.plan_file.is_file():
            write_json_atomically(self.plan_file, {**record, "plan_sha256": plan_sha256})
        # Temporary files of killed runs: never complete, so never worth keeping.
        for stale in [*self.out.glob(f".{self.name}-*.tmp-*"), *self.state.glob(".*.tmp-*")]:
            stale.unlink(missing_ok=True)

    def _lock(self) -> None:
        self._lock_file = open(self.state / "lock", "a")  # "a": taking the lock changes no file
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise UsageError(f"another make_shards run is writing {self.name} into {self.out}; "
                             "wait for it or stop it") from err
        except OSError:
            pass  # file systems without flock: run unguarded rather than not at all

    def finished_record(self, number: int, plan_sha256: str) -> dict | None:
        """The shard's completion record if the shard is complete and belongs to this plan."""
        try:
            record = json.loads(self.sidecar(number).read_text())
            complete = (record["plan_sha256"] == plan_sha256
                        and self.tar(number).stat().st_size == record["filesize"])
        except (OSError, ValueError, KeyError):
            return None
        return record if complete else None


# ---------------------------------------------------------------- running

class Progress:
    """One status line on stderr: a rewritten \\r line on a terminal, a line per 30 s in logs."""

    def __init__(self, name: str, total_shards: int, done_shards: int, pending_images: int):
        self.name, self.total_shards, self.done_shards = name, total_shards, done_shards
        self.pending_images, self.images = pending_images, 0
        self.start = self.last_shown = time.monotonic()
        self.tty = sys.stderr.isatty()

    def update(self, images: int, shard_finished: bool = False) -> None:
        self.images = images
        self.done_shards += shard_finished
        now = time.monotonic()
        if now - self.last_shown >= (0.5 if self.tty else 30.0) or (shard_finished and self.tty):
            self.last_shown = now
            self._show(now)

    def _show(self, now: float) -> None:
        rate = self.images / max(now - self.start, 1e-9)
        eta = (self.pending_images - self.images) / rate if rate > 0 else 0.0
        seconds = int(eta)
        eta_text = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        line = (f"[{self.name}] shards {self.done_shards}/{self.total_shards}  "
                f"images {self.images}/{self.pending_images}  {rate:.1f} img/s  ETA {eta_text}")
        sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
        sys.stderr.flush()

    def finish(self) -> float:
        elapsed = time.monotonic() - self.start
        self._show(time.monotonic())
        if self.tty:
            sys.stderr.write("\n")
        return elapsed


def run_tasks(tasks: list[ShardTask], workers: int, progress: Progress) -> None:
    if workers == 1 or len(tasks) <= 1:
        images = 0

        def count_image():
            nonlocal images
            images += 1
            progress.update(images)

        for task in tasks:
            convert_shard(task, count_image)
            progress.update(images, shard_finished=True)
        return
    context = multiprocessing.get_context()
    images_done = context.Value("q", 0)
    with context.Pool(min(workers, len(tasks)), init_pool_worker, (images_done,)) as pool:
        results = pool.imap(convert_shard_in_pool, tasks)  # in shard order
        finished = 0
        while finished < len(tasks):
            try:
                results.next(timeout=0.5)
                finished += 1
                progress.update(images_done.value, shard_finished=True)
            except multiprocessing.TimeoutError:
                progress.update(images_done.value)


# ---------------------------------------------------------------- index and summary

def build_index(folder: OutputFolder, records: list[dict], listing_skipped, classes, args, plan_sha256) -> dict:
    skipped = [{"filename": s.filename, "reason": s.reason} for s in listing_skipped]
    skipped += [s for r in records for s in r["skipped"]]
    reencoded = sorted((e for r in records for e in r["reencoded"]), key=lambda e: e["filename"])
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": folder.name,
        "shardlist": [{k: r[k] for k in ("url", "nsamples", "filesize", "sha256")} for r in records],
        "total": sum(r["nsamples"] for r in records),
        "classes": classes,
        "num_classes": len(classes),
        "skipped": sorted(skipped, key=lambda s: s["filename"]),
        "reencoded": reencoded,
        "reencoded_by_reason": dict(sorted(Counter(e["reason"] for e in reencoded).items())),
        "plan_sha256": plan_sha256,
        **plan_settings(args),
    }


def print_summary(index: dict, folder: OutputFolder, written: int, elapsed: float, images: int) -> None:
    shards = len(index["shardlist"])
    print(f"{folder.name}: {index['total']} samples, {index['num_classes']} classes, {shards} shards in "
          f"{folder.out} ({written} written now, {shards - written} already complete)")
    if images:
        print(f"  converted {images} images in {elapsed:.1f} s ({images / max(elapsed, 1e-9):.1f} img/s)")
    reasons = ", ".join(f"{why}: {n}" for why, n in index["reencoded_by_reason"].items())
    print(f"  re-encoded to RGB JPEG: {len(index['reencoded'])}" + (f" ({reasons})" if reasons else ""))
    print(f"  skipped: {len(index['skipped'])} files")
    for entry in index["skipped"][:SUMMARY_MAX_SKIPPED]:
        print(f"    {entry['filename']}: {entry['reason']}")
    if len(index["skipped"]) > SUMMARY_MAX_SKIPPED:
        print(f"    ... and {len(index['skipped']) - SUMMARY_MAX_SKIPPED} more, all listed in the index")
    print(f"  index: {folder.index}")


def convert(args) -> dict:
    root = args.imagenet_root
    classes = resolve_classes(root, args.split, args.out)
    try:
        images, listing_skipped = list_split(root, args.split, classes)
    except ImageNetLayoutError as err:
        raise UsageError(str(err)) from err
    shards, plan_sha256 = make_plan(images, classes, args)
    folder = OutputFolder(args.out, args.split)
    folder.check_compatible(plan_sha256, plan_settings(args))
    folder.prepare(plan_sha256, {**plan_settings(args), "num_shards": len(shards), "classes": classes})

    tasks = [ShardTask(str(folder.tar(n)), str(folder.sidecar(n)), str(root), tuple(shard),
                       args.resize_short_side, plan_sha256)
             for n, shard in enumerate(shards) if folder.finished_record(n, plan_sha256) is None]
    pending_images = sum(len(t.samples) for t in tasks)
    progress = Progress(folder.name, len(shards), len(shards) - len(tasks), pending_images)
    run_tasks(tasks, args.workers, progress)
    elapsed = progress.finish()

    records = [folder.finished_record(n, plan_sha256) for n in range(len(shards))]
    if any(r is None for r in records):  # only if something outside this run interfered
        raise UsageError(f"some shards in {args.out} vanished during the run; rerun the same command")
    index = build_index(folder, records, listing_skipped, classes, args, plan_sha256)
    write_json_atomically(folder.index, index)
    print_summary(index, folder, len(tasks), elapsed, pending_images)
    return index


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except UsageError as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
