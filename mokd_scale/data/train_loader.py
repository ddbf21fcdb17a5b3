"""Training loader: resampled shards -> shuffle buffer -> decode + multi-crop -> uint8 micro-batches.

Why resampling: every DataLoader worker of every rank draws shards with replacement from the whole
list, so no worker can run dry (fewer shards than ranks x workers still works) and every rank yields
micro-batches forever; an "epoch" is a fixed number of micro-batches per worker that only re-seeds the
streams. Equal step counts on every rank follow, which is what keeps ZeRO collectives from hanging.

Seeds and resume: each worker runs one logical stream whose shard, shuffle and augmentation draws are
re-seeded at each epoch from (seed, epoch, rank, stream). Every batch carries its stream's position
(ShardSampleStream.state plus the epoch and augmentation generator); TrainLoader keeps the position
after the last batch the training consumed, and a checkpoint stores it per rank. A resumed loader
restores every stream there and rotates the streams over the workers so that the worker serving the
first batch (the DataLoader takes batches from its workers round-robin) runs the stream whose turn it
was: the resumed run sees exactly the batches of an uninterrupted one. Without a usable position (a
checkpoint from another world size, worker count or shard list) the streams restart at the step's
epoch with the step mixed into the seeds: fresh samples, not a replay of the epoch's first ones.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import zlib

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mokd_scale.config import gradient_accumulation_steps, steps_per_epoch
from mokd_scale.data.multicrop import MultiCrop, stack_crops
from mokd_scale.data.seeds import mixed_seed, random_state, set_random_state
from mokd_scale.data.shard_spec import resolve_shards
from mokd_scale.data.shard_stream import ShardSampleStream
from mokd_scale.data.synthetic import SyntheticTrainStream
from mokd_scale.data.tar_stream import image_bytes, label_of

log = logging.getLogger(__name__)
POSITION_FORMAT = 1
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies


class ShardTrainStream(IterableDataset):
    """Endless micro-batches from tar shards; one independent stream per DataLoader worker."""

    def __init__(self, urls, data_cfg, micro_batch_size, rank, seed, start_step, first_epoch,
                 batches_per_epoch_per_rank):
        self.urls = urls
        self.augment = MultiCrop.from_config(data_cfg)
        self.shuffle_buffer = max(1, int(data_cfg.shuffle_buffer))
        self.micro_batch_size = micro_batch_size
        self.rank, self.seed = rank, seed
        self.first_epoch = first_epoch
        self.batches_per_epoch_per_rank = batches_per_epoch_per_rank
        self.positions: dict[int, dict] = {}  # stream -> saved position to continue from
        self.first_stream = 0  # the stream DataLoader worker 0 runs: the one whose batch comes next
        # A fresh start mid-run mixes the step into the seeds, so that it does not repeat the samples
        # its epoch began with; a continued position needs the seeds of the run that saved it.
        self.salt = start_step
        self.continued = False

    def continue_from(self, saved: dict, streams: int) -> None:
        """Take a TrainLoader.state_dict(); one saved with other settings is refused with a warning."""
        if saved.get("format") != POSITION_FORMAT or saved.get("fingerprint") != self.fingerprint(streams):
            log.warning("the saved data position was written with another shard list, worker count, world "
                        "size or batch size: the data streams restart with fresh samples")
            return
        self.positions = {int(stream): position for stream, position in saved["positions"].items()}
        self.first_stream = int(saved["next_stream"])
        self.salt, self.first_epoch, self.continued = 0, 0, True

    def fingerprint(self, streams: int) -> int:
        """What a saved position depends on; another value means it cannot be replayed here."""
        key = repr((self.urls, self.shuffle_buffer, self.micro_batch_size, self.rank, self.seed,
                    self.batches_per_epoch_per_rank, streams))
        return zlib.crc32(key.encode())

    def _stream_id(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return (worker + self.first_stream) % workers, workers

    def __iter__(self):
        stream, streams = self._stream_id()
        share, extra = divmod(self.batches_per_epoch_per_rank, streams)
        # Never zero: a stream that yields nothing stalls its rank (and then every rank).
        batches_per_epoch = max(1, share + (stream < extra))
        stream_rng, augment_rng = random.Random(), random.Random()
        samples = ShardSampleStream(self.urls, self.shuffle_buffer, stream_rng)
        epoch, batch = self.first_epoch, 0
        position = self.positions.get(stream)
        if position is not None:
            samples.restore(position["samples"])
            set_random_state(augment_rng, position["augment_rng"])
            epoch, batch = int(position["epoch"]), int(position["batch"])
        while True:
            if batch == 0:
                # Re-seeding in place changes every draw from here on (shard choice, shuffle, crops) while
                # the shuffle buffer carries over: no refill stall (and re-read) at each epoch start.
                stream_rng.seed(mixed_seed(self.seed, epoch, self.rank, stream, self.salt, 0))
                augment_rng.seed(mixed_seed(self.seed, epoch, self.rank, stream, self.salt, 1))
            micro_batch = self._batch(samples, augment_rng)
            batch += 1
            if batch == batches_per_epoch:
                epoch, batch = epoch + 1, 0
            micro_batch["stream"] = {"id": stream, "position": {
                "epoch": epoch, "batch": batch, "augment_rng": random_state(augment_rng), "samples": samples.state()}}
            yield micro_batch

    def _batch(self, samples: ShardSampleStream, augment_rng: random.Random) -> dict:
        crops, labels, corrupt = [], [], 0
        while len(crops) < self.micro_batch_size:
            sample = samples.next()
            try:
                label = label_of(sample)
                sample_crops = self.augment(image_bytes(sample), augment_rng)
            except Exception as err:  # noqa: BLE001 - PIL raises many types on corrupt data
                corrupt += 1
                log.debug("skipping corrupt sample %s: %s", sample.get("__key__"), err)
                continue
            crops.append(sample_crops)
            labels.append(label)
        return {"crops": stack_crops(crops),
                "index": torch.full((len(crops),), -1, dtype=torch.long),
                "label": torch.tensor(labels, dtype=torch.long),
                "skipped": corrupt + samples.take_read_errors()}


class TrainLoader:
    """Infinite iterable of micro-batch dicts ({"crops", "index", "label", "skipped"}); also says how steps
    map to epochs, and (state_dict) where the data stands after the last batch handed out."""

    def __init__(self, dataset, workers: int, steps_per_epoch: int, micro_batches_per_step: int):
        self.dataset = dataset
        self.steps_per_epoch = steps_per_epoch
        self.micro_batches_per_step = micro_batches_per_step
        self.streams = max(1, workers)
        self.positions = dict(getattr(dataset, "positions", {}))
        self.next_stream = getattr(dataset, "first_stream", 0)
        # Pinned batches make the step's non_blocking host->GPU copy truly asynchronous. The
        # loader's own generator keeps it from drawing from the global one, which must evolve alike
        # in a resumed run (whose loader starts mid-run) and an uninterrupted one.
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers, generator=torch.Generator(),
                                 persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                                 worker_init_fn=end_with_the_rank)

    def __iter__(self):
        for batch in self.loader:
            stream = batch.pop("stream", None)
            if stream is not None:
                self.positions[stream["id"]] = stream["position"]
                self.next_stream = (stream["id"] + 1) % self.streams
            yield batch

    def state_dict(self) -> dict | None:
        """None for the synthetic source, whose batches follow from the step alone."""
        if not isinstance(self.dataset, ShardTrainStream):
            return None
        return {"format": POSITION_FORMAT, "fingerprint": self.dataset.fingerprint(self.streams),
                "next_stream": self.next_stream, "positions": dict(self.positions)}

    def load_state_dict(self, position: dict | None) -> None:
        """Continue from a state_dict() saved at the start step; before the first batch is drawn (the
        workers receive the dataset then)."""
        if position is None or not isinstance(self.dataset, ShardTrainStream):
            return
        self.dataset.continue_from(position, self.streams)
        self.positions = dict(self.dataset.positions)
        self.next_stream = self.dataset.first_stream

    @property
    def continued(self) -> bool:
        """Whether the streams continue a saved position (False: fresh streams, or the synthetic source)."""
        return bool(getattr(self.dataset, "continued", False))


def end_with_the_rank(worker_id: int) -> None:
    """A killed rank's workers would live on for up to 5 s (PyTorch polls for the parent), holding the
    rank's output open, and Slurm ends the job step only when that closes; the kernel ends them with
    the rank instead (Linux; elsewhere the polling stays)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the rank died before the line above
            os._exit(1)


def build_train_loader(config, rank: int, world_size: int, start_step: int = 0) -> TrainLoader:
    """This rank's micro-batches for the recipe `config` (data, train batch sizes, seed), from start_step;
    TrainLoader.load_state_dict continues a saved position."""
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
