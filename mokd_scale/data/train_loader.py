"""Training loader: resampled shards -> shuffle buffer -> decode + multi-crop -> uint8 micro-batches.

Why resampling: every DataLoader worker of every rank draws shards with replacement from the whole
list, so no worker can run dry (fewer shards than ranks x workers still works) and every rank yields
micro-batches forever; an "epoch" is a fixed number of micro-batches per worker that only re-seeds the
streams. Equal step counts on every rank follow, which is what keeps ZeRO collectives from hanging.

Seeds: at each epoch a worker re-seeds its shard, shuffle and augmentation draws from (seed, epoch,
rank, worker, start_step), so the whole stream is reproducible. Mixing in start_step makes a resumed
run draw fresh samples instead of replaying the first ones of its epoch; exact mid-epoch replay is
not a goal (statistically equivalent, like any resampled WebDataset run).
"""
from __future__ import annotations

import logging
import random
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mokd_scale.config import gradient_accumulation_steps, steps_per_epoch
from mokd_scale.data.multicrop import MultiCrop, stack_crops
from mokd_scale.data.seeds import mixed_seed
from mokd_scale.data.shard_spec import resolve_shards
from mokd_scale.data.synthetic import SyntheticTrainStream
from mokd_scale.data.tar_stream import image_bytes, label_of, read_shard

log = logging.getLogger(__name__)

# A worker that opens this many shards in a row without one usable sample gives up: the shard
# list is wrong (not a transient read error), and spinning silently would stall every rank.
_MAX_EMPTY_SHARDS_IN_A_ROW = 50


def _shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Reservoir shuffle of an endless stream: keep `buffer_size` items, emit a random one per new item.
    The buffer holds encoded samples (~110 KB for an ImageNet JPEG), decoding happens after."""
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item


class _SkipCounter:
    """Corrupt samples and unreadable shards seen since the last batch was handed out."""

    def __init__(self):
        self.count = 0

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _resampled_samples(urls: list[str], rng: random.Random, skips: _SkipCounter) -> Iterator[dict]:
    empty_in_a_row = 0
    while True:
        url = rng.choice(urls)
        produced = 0
        try:
            for sample in read_shard(url):
                produced += 1
                yield sample
        except Exception as err:  # noqa: BLE001 - a bad shard must not kill a multi-day run
            skips.count += 1
            log.warning("skipping the rest of shard %s after a read error: %s", url, err)
        empty_in_a_row = 0 if produced else empty_in_a_row + 1
        if empty_in_a_row >= _MAX_EMPTY_SHARDS_IN_A_ROW:
            raise RuntimeError(f"{empty_in_a_row} shards in a row gave no sample (last {url!r}); "
                               "check data.train_shards")


class ShardTrainStream(IterableDataset):
    """Endless micro-batches from tar shards; one independent stream per DataLoader worker."""

    def __init__(self, urls, data_cfg, micro_batch_size, rank, seed, start_step, first_epoch,
                 batches_per_epoch_per_rank):
        self.urls = urls
        self.augment = MultiCrop.from_config(data_cfg)
        self.shuffle_buffer = max(1, int(data_cfg.shuffle_buffer))
        self.micro_batch_size = micro_batch_size
        self.rank, self.seed, self.start_step = rank, seed, start_step
        self.first_epoch = first_epoch
        self.batches_per_epoch_per_rank = batches_per_epoch_per_rank

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self):
        worker, workers = self._worker()
        share, extra = divmod(self.batches_per_epoch_per_rank, workers)
        # Never zero: a worker that yields nothing stalls its rank (and then every rank).
        batches_per_epoch = max(1, share + (worker < extra))
        stream_rng, augment_rng = random.Random(), random.Random()
        skips = _SkipCounter()
        samples = _shuffled(_resampled_samples(self.urls, stream_rng, skips), self.shuffle_buffer,
                            stream_rng)
        epoch = self.first_epoch
        while True:
            # Re-seeding in place changes every draw from here on (shard choice, shuffle, crops) while
            # the shuffle buffer carries over: no refill stall (and re-read) at each epoch start.
            stream_rng.seed(mixed_seed(self.seed, epoch, self.rank, worker, self.start_step, 0))
            augment_rng.seed(mixed_seed(self.seed, epoch, self.rank, worker, self.start_step, 1))
            for _ in range(batches_per_epoch):
                yield self._batch(samples, augment_rng, skips)
            epoch += 1

    def _batch(self, samples: Iterator[dict], augment_rng: random.Random, skips: _SkipCounter) -> dict:
        crops, labels = [], []
        while len(crops) < self.micro_batch_size:
            sample = next(samples)
            try:
                label = label_of(sample)
                sample_crops = self.augment(image_bytes(sample), augment_rng)
            except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt data
                skips.count += 1
                log.debug("skipping corrupt sample %s: %s", sample.get("__key__"), err)
                continue
            crops.append(sample_crops)
            labels.append(label)
        return {"crops": stack_crops(crops),
                "index": torch.full((len(crops),), -1, dtype=torch.long),
                "label": torch.tensor(labels, dtype=torch.long),
                "skipped": skips.take()}


class TrainLoader:
    """Infinite iterable of micro-batch dicts ({"crops", "index", "label", "skipped"}); also says how steps map to epochs."""

    def __init__(self, dataset, workers: int, steps_per_epoch: int, micro_batches_per_step: int):
        self.dataset = dataset
        self.steps_per_epoch = steps_per_epoch
        self.micro_batches_per_step = micro_batches_per_step
        # Pinned batches make the coordinator's non_blocking host->GPU copy truly asynchronous.
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                 persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def __iter__(self):
        return iter(self.loader)


def build_train_loader(config, rank: int, world_size: int, start_step: int = 0) -> TrainLoader:
    """This rank's micro-batches for the recipe `config` (data, train batch sizes, seed)."""
    data_cfg, micro_batch_size, seed = config.data, config.train.micro_batch_size, config.seed
    accumulation = gradient_accumulation_steps(config, world_size)
    epoch_steps = steps_per_epoch(config)
    first_epoch = start_step // epoch_steps
    workers = max(0, int(data_cfg.workers))
    if data_cfg.source == "synthetic":
        dataset = SyntheticTrainStream(data_cfg, micro_batch_size, accumulation, rank, world_size, seed,
                                       start_step)
    elif data_cfg.source == "shards":
        shards = resolve_shards(data_cfg.train_shards, "data.train_shards")
        if len(shards.urls) < world_size * max(1, workers) and rank == 0:
            log.warning("data.train_shards has %d shards for %d ranks x %d workers: streams will "
                        "share shards (fine with resampling, but use more shards for real runs)",
                        len(shards.urls), world_size, max(1, workers))
        dataset = ShardTrainStream(shards.urls, data_cfg, micro_batch_size, rank, seed, start_step,
                                   first_epoch, epoch_steps * accumulation)
    else:
        raise ValueError(f"data.source={data_cfg.source!r}: expected 'shards' or 'synthetic'")
    return TrainLoader(dataset, workers, epoch_steps, accumulation)
