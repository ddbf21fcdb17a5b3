"""Evaluation loader: every sample exactly once across all ranks, resize + centre crop, normalised.

Work is split over "readers" (rank, DataLoader worker). With at least as many shards as readers at a
level, shards are dealt round-robin; with fewer, every reader of that level streams the same shards
and keeps every k-th sample (position modulo the reader count) so small validation sets still split
evenly. Ranks may get different batch counts: callers gather after the loop, never per batch.

"index" is the sample's global position (shard offsets from the index JSON's nsamples); for a brace
pattern, whose shard sizes are unknown, it is shard_number * 2**32 + position_in_shard: unique and in
shard order, which is what the k-NN probe sorts and de-duplicates by.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tarfile

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mokd_scale.data.multicrop import open_image
from mokd_scale.data.shard_spec import ShardList, resolve_shards
from mokd_scale.data.tar_stream import image_bytes, label_of, read_shard

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReaderPlan:
    """Shards (by number) one reader streams, and which stream positions it keeps."""
    shard_numbers: list[int]
    modulo: int
    remainder: int


def split_among(plan: ReaderPlan, parts: int, part: int) -> ReaderPlan:
    """Give `part` of `parts` readers its share of `plan`: whole shards when there are enough and
    the plan still owns whole shards, else every parts-th of the samples `plan` keeps."""
    if plan.modulo == 1 and len(plan.shard_numbers) >= parts:
        return ReaderPlan(plan.shard_numbers[part::parts], 1, 0)
    return ReaderPlan(plan.shard_numbers, plan.modulo * parts, plan.remainder + plan.modulo * part)


def reader_plan(num_shards: int, rank: int, world_size: int, worker: int, workers: int) -> ReaderPlan:
    by_rank = split_among(ReaderPlan(list(range(num_shards)), 1, 0), world_size, rank)
    return split_among(by_rank, workers, worker)


def eval_pixels(data: bytes, resize: int, crop: int) -> np.ndarray:
    """Resize the shorter side to `resize` (bicubic, antialiased) and centre-crop `crop`: HWC uint8."""
    img = open_image(data)
    width, height = img.size
    short = min(width, height)
    if img.format == "JPEG" and short >= 2 * resize:
        # libjpeg's DCT scaling: decode at >= the target size, far cheaper for large photos.
        img.draft("RGB", (math.ceil(width * resize / short), math.ceil(height * resize / short)))
    img = img.convert("RGB")
    # Output size from the original aspect ratio (torchvision's Resize(int) rule).
    if width <= height:
        size = (int(resize * height / width), resize)
    else:
        size = (resize, int(resize * width / height))
    source = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(source, size=size, mode="bicubic", antialias=True)
    top = int(round((size[0] - crop) / 2.0))
    left = int(round((size[1] - crop) / 2.0))
    return resized[0, :, top:top + crop, left:left + crop].permute(1, 2, 0).numpy()


class EvalStream(IterableDataset):
    def __init__(self, shards: ShardList, data_cfg, batch_size: int, rank: int, world_size: int):
        if data_cfg.eval_crop > data_cfg.eval_resize:
            raise ValueError(f"data.eval_crop={data_cfg.eval_crop} must not exceed "
                             f"data.eval_resize={data_cfg.eval_resize}")
        self.shards, self.batch_size = shards, batch_size
        self.rank, self.world_size = rank, world_size
        self.resize, self.crop = int(data_cfg.eval_resize), int(data_cfg.eval_crop)
        self.mean = torch.tensor(data_cfg.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(data_cfg.std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        counts = shards.nsamples
        self.offsets = None if counts is None else np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()

    def global_index(self, shard_number: int, position: int) -> int:
        if self.offsets is not None:
            return int(self.offsets[shard_number]) + position
        return (shard_number << 32) + position

    def samples(self, plan: ReaderPlan):
        """(index, sample) pairs this reader keeps, in stream order."""
        stream_position = 0
        for shard_number in plan.shard_numbers:
            url = self.shards.urls[shard_number]
            try:
                for position, sample in enumerate(read_shard(url)):
                    if stream_position % plan.modulo == plan.remainder:
                        yield self.global_index(shard_number, position), sample
                    stream_position += 1
            except (OSError, EOFError, ValueError, tarfile.TarError) as err:
                # Eval must not silently drop part of the split: fail and say which shard.
                raise RuntimeError(f"eval shard {url!r} is unreadable: {err}") from err

    def make_batch(self, images, labels, indices, skipped) -> dict:
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
        return {"image": (pixels - self.mean) / self.std,
                "label": torch.tensor(labels, dtype=torch.long),
                "index": torch.tensor(indices, dtype=torch.long),
                "skipped": skipped}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan = reader_plan(len(self.shards.urls), self.rank, self.world_size, worker, workers)
        images, labels, indices, skipped = [], [], [], 0
        for index, sample in self.samples(plan):
            try:
                label = label_of(sample)
                images.append(eval_pixels(image_bytes(sample), self.resize, self.crop))
            except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt data
                skipped += 1
                log.warning("eval: skipping corrupt sample %s: %s", sample.get("__key__"), err)
                continue
            labels.append(label)
            indices.append(index)
            if len(images) == self.batch_size:
                yield self.make_batch(images, labels, indices, skipped)
                images, labels, indices, skipped = [], [], [], 0
        if images:
            yield self.make_batch(images, labels, indices, skipped)


def build_eval_loader(shards: str, data_cfg, batch_size: int, rank: int, world_size: int) -> DataLoader:
    """Batches {"image": normalised float (b,3,S,S), "label", "index", "skipped"}; one pass, each
    sample of `shards` (index JSON or brace pattern) on exactly one rank."""
    shard_list = resolve_shards(shards, "eval shards (data.val_shards / data.knn_train_shards)")
    dataset = EvalStream(shard_list, data_cfg, batch_size, rank, world_size)
    workers = max(0, int(data_cfg.workers))
    return DataLoader(dataset, batch_size=None, num_workers=workers)
