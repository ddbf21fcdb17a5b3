"""Training loader: passes over the shards -> shuffle buffer -> decode + multi-crop -> uint8 micro-batches.

Streams and passes: every DataLoader worker of every rank runs one stream; pass q deals all shards over
the run's streams (data/shard_passes.py), so within a pass each sample is read once, by one stream, and
a stream that finishes its share goes on with its share of the next pass: no stream runs dry (fewer
shards than streams still works, the streams then share shards), and every rank yields micro-batches
forever. An "epoch" of steps is a fixed number of micro-batches per stream that re-seeds the shuffle and
augmentation draws from (seed, epoch, rank, stream); equal step counts on every rank follow, which is
what keeps ZeRO collectives from hanging. A pass ends near, not exactly at, an epoch boundary (shards
hold different numbers of samples).

Resume: every batch carries its stream's position (ShardSampleStream.state plus the epoch and
augmentation generator); TrainLoader keeps the position after the last batch the training consumed,
and a checkpoint stores it per rank. On the same world size and worker count, a resumed loader restores
every stream there and rotates the streams over the workers so that the worker serving the first batch
(the DataLoader takes batches from its workers round-robin) runs the stream whose turn it was: the
resumed run sees exactly the batches of an uninterrupted one. On another world size, whatever the
worker counts (continue_from_ranks), what all the saved streams had not yet handed out (their buffered
samples, the rest of the shards they were reading, their remaining shares of the pass) is dealt over
the new streams, whose draws are seeded afresh from the step: within the pass, no sample is read twice and
none is left out (docs/cluster.md says what a shuffle buffer does at the pass's end). A checkpoint of
another shard list or seed restarts the streams at the step's pass with the step mixed into the seeds.
"""
from __future__ import annotations

import contextlib
import atexit
import ctypes
import logging
import multiprocessing
import os
import random
import signal
import zlib

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mokd_scale.config import gradient_accumulation_steps, steps_per_epoch
from mokd_scale.data.multicrop import MultiCrop, stack_crops
from mokd_scale.data.seeds import mixed_seed, random_state, set_random_state
from mokd_scale.data.shard_passes import share_of, unread_work
from mokd_scale.data.shard_spec import resolve_shards
from mokd_scale.data.shard_stream import ShardSampleStream
from mokd_scale.data.synthetic import SyntheticTrainStream
from mokd_scale.data.tar_stream import image_bytes, label_of

log = logging.getLogger(__name__)
POSITION_FORMAT = 2
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies


class ShardTrainStream(IterableDataset):
    """Endless micro-batches from tar shards; one stream per DataLoader worker (`workers` of them, 0: one)."""

    def __init__(self, urls, data_cfg, micro_batch_size, rank, seed, start_step, first_epoch,
                 batches_per_epoch_per_rank, world_size: int = 1, workers: int = 0):
        self.urls = urls
        self.augment = MultiCrop.from_config(data_cfg)
        self.shuffle_buffer = max(1, int(data_cfg.shuffle_buffer))
        self.micro_batch_size = micro_batch_size
        self.rank, self.seed, self.world_size = rank, seed, world_size
        self.streams = max(1, workers)
        self.first_epoch = first_epoch
        self.batches_per_epoch_per_rank = batches_per_epoch_per_rank
        # stream -> the position it continues from: where a fresh stream starts, until a checkpoint says otherwise
        self.positions: dict[int, dict] = {stream: start_of_epoch(first_epoch, first_epoch - 1)
                                           for stream in range(self.streams)}
        self.first_stream = 0  # the stream DataLoader worker 0 runs: the one whose batch comes next
        # A fresh start mid-run mixes the step into the seeds, so that it does not repeat the draws its epoch
        # began with; a continued position needs the seeds of the run that saved it.
        self.salt = start_step
        self.continued = self.carried = False

    def continue_from(self, saved: dict) -> None:
        """Take a TrainLoader.state_dict() of the same world size; one saved with other settings is refused
        with a warning."""
        if saved.get("format") != POSITION_FORMAT or saved.get("fingerprint") != self.fingerprint():
            log.warning("the saved data position was written with another shard list, worker count, world "
                        "size or batch size: the data streams restart with fresh samples")
            return
        self.positions = {int(stream): position for stream, position in saved["positions"].items()}
        self.first_stream = int(saved["next_stream"])
        self.salt, self.continued = int(saved["salt"]), True

    def continue_from_ranks(self, saved: list[dict]) -> None:
        """Every saved rank's TrainLoader.state_dict(), in rank order, of another world size (any worker count):
        this rank's streams take their share of what the saved streams had not yet handed out."""
        if any(rank.get("format") != POSITION_FORMAT or rank.get("shards") != self.shards_fingerprint()
               for rank in saved):
            log.warning("the saved data positions were written with another shard list or seed (or an older "
                        "mokd_scale): the data streams restart with fresh samples")
            return
        old = [position["samples"] for rank in saved for _, position in sorted(rank["positions"].items())]
        buffered, work, last_pass = unread_work(old, len(self.urls), self.seed)
        total = self.world_size * self.streams
        for stream in range(self.streams):
            origins, items = share_of(buffered, work, self.rank * self.streams + stream, total)
            self.positions[stream] = start_of_epoch(self.first_epoch, last_pass, items, origins)
        self.carried = True

    def fingerprint(self) -> int:
        """What a saved position depends on; another value means it cannot be replayed here."""
        key = repr((self.urls, self.shuffle_buffer, self.micro_batch_size, self.rank, self.seed,
                    self.batches_per_epoch_per_rank, self.streams, self.world_size))
        return zlib.crc32(key.encode())

    def shards_fingerprint(self) -> int:
        """What the passes depend on: saved leftovers of another shard list or seed are not this run's."""
        return zlib.crc32(repr((self.urls, self.seed)).encode())

    def _stream_id(self) -> int:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        return (worker + self.first_stream) % self.streams

    def __iter__(self):
        stream = self._stream_id()
        share, extra = divmod(self.batches_per_epoch_per_rank, self.streams)
        # Never zero: a stream that yields nothing stalls its rank (and then every rank).
        batches_per_epoch = max(1, share + (stream < extra))
        stream_rng, augment_rng = random.Random(), random.Random()
        samples = ShardSampleStream(self.urls, self.shuffle_buffer, stream_rng, self.seed,
                                    self.rank * self.streams + stream, self.world_size * self.streams)
        position = self.positions[stream]
        samples.restore(position["samples"])
        set_random_state(augment_rng, position["augment_rng"])
        epoch, batch = int(position["epoch"]), int(position["batch"])
        while True:
            if batch == 0:
                # Re-seeding in place changes every draw from here on (shuffle, crops) while the shuffle
                # buffer carries over: no refill stall (and re-read) at each epoch start.
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
        if workers > 0:
            # Registered after multiprocessing's own exit handler, so it runs before that one.
            atexit.unregister(kill_workers_at_exit)
            atexit.register(kill_workers_at_exit)

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
        return {"format": POSITION_FORMAT, "fingerprint": self.dataset.fingerprint(),
                "shards": self.dataset.shards_fingerprint(), "salt": self.dataset.salt,
                "next_stream": self.next_stream, "positions": dict(self.positions)}

    def load_state_dict(self, position: dict | None) -> None:
        """Continue from a state_dict() saved at the start step; before the first batch is drawn (the
        workers receive the dataset then)."""
        if position is None or not isinstance(self.dataset, ShardTrainStream):
            return
        self.dataset.continue_from(position)
        self.positions = dict(self.dataset.positions)
        self.next_stream = self.dataset.first_stream

    def load_state_dicts_of_ranks(self, positions: list[dict | None]) -> None:
        """Every rank's state_dict() of a run on another world size, in rank order (train/state.py)."""
        if not isinstance(self.dataset, ShardTrainStream) or any(p is None for p in positions):
            return
        self.dataset.continue_from_ranks(positions)
        self.positions = dict(self.dataset.positions)

    @property
    def continued(self) -> bool:
        """Whether the streams continue a saved position (False: fresh streams, or the synthetic source)."""
        return bool(getattr(self.dataset, "continued", False))

    @property
    def carried(self) -> bool:
        """Whether the streams took over another world size's unread samples."""
        return bool(getattr(self.dataset, "carried", False))


def start_of_epoch(epoch: int, pass_index: int, work=(), origins=()) -> dict:
    """A stream's position at the start of `epoch`, before its first batch: with `work` items and buffered
    `origins` to read first (data/shard_passes.py), then its share of pass pass_index + 1. The generator
    states are placeholders: the epoch's start re-seeds both."""
    placeholder = random_state(random.Random(0))
    return {"epoch": epoch, "batch": 0, "augment_rng": placeholder, "samples": {
        "rng": placeholder, "pass": pass_index, "empty_in_a_row": 0,
        "work": torch.tensor(list(work), dtype=torch.int64).reshape(-1, 4),
        "origins": torch.tensor(list(origins), dtype=torch.int64).reshape(-1, 3)}}


def end_with_the_rank(worker_id: int) -> None:
    """Workers leave SIGTERM to their rank: scancel (preemption) signals every process of the job, and a
    worker that died of it would fail the rank's next batch before the rank could save its checkpoint.
    A killed rank's workers would live on for up to 5 s (PyTorch polls for the parent), holding the
    rank's output open, and Slurm ends the job step only when that closes; the kernel ends them with
    the rank instead (Linux; elsewhere the polling stays)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the rank died before the line above
            os._exit(1)


def kill_workers_at_exit() -> None:
    """The rank's exit ends its loader workers with SIGKILL. They ignore SIGTERM (end_with_the_rank), and
    multiprocessing's exit handler ends daemonic children with SIGTERM and then waits for them without a
    timeout: a rank that stops on an error with its workers still busy (their iterator not yet shut
    down) would never exit, and its job would never end."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these kills as worker failures
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


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
                        "share shards, and a pass reads some samples twice (use more shards for real runs)",
                        len(shards.urls), world_size, max(1, workers))
        dataset = ShardTrainStream(shards.urls, data_cfg, micro_batch_size, rank, seed, start_step,
                                   first_epoch, epoch_steps * accumulation, world_size, workers)
    else:
        raise ValueError(f"data.source={data_cfg.source!r}: expected 'shards' or 'synthetic'")
    return TrainLoader(dataset, workers, epoch_steps, accumulation)
