"""One endless stream of encoded samples: its share of each pass over the shards (data/shard_passes.py),
read in order through a reservoir shuffle buffer.

Its position is small and exact: the generator state, the pass, the work items still to read (the shard
being read first, with how far), and for each buffered sample where it came from (shard, ordinal, byte
offset). restore() rebuilds the buffer by reading those samples again (bytes only, no decoding; one seek
each in a plain .tar file, so about shuffle_buffer samples are read, not the shards they came from), and
a resumed stream continues with exactly the samples an uninterrupted one would have produced. carry_on()
starts a stream from another run's leftovers instead (a changed number of streams: train_loader.py).
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Iterator

import torch

from mokd_scale.data.seeds import random_state, set_random_state
from mokd_scale.data.shard_passes import pass_shards
from mokd_scale.data.tar_stream import OFFSET, read_samples_at, read_shard, seekable

log = logging.getLogger(__name__)

# A stream that opens this many shards in a row without one usable sample gives up: the shard
# list is wrong (not a transient read error), and spinning silently would stall every rank.
MAX_EMPTY_SHARDS_IN_A_ROW = 50
NO_SHARD = -1


class ShardSampleStream:
    """Samples of stream `stream` of `streams`: its shards of each pass (from `first_pass` on), each read in
    order, mixed through a buffer of `buffer_size` (a random buffered sample leaves for each one that enters)."""

    def __init__(self, urls: list[str], buffer_size: int, rng: random.Random, seed: int = 0, stream: int = 0,
                 streams: int = 1, first_pass: int = 0):
        self.urls = urls
        self.buffer_size = buffer_size
        self.rng = rng
        self.seed, self.stream, self.streams = seed, stream, streams
        self.buffer: list[dict] = []
        self.origins: list[tuple[int, int, int]] = []  # (shard, ordinal, offset) per buffered sample
        self.pass_index = first_pass - 1  # the pass of the last share taken; the first read takes first_pass
        self.queue: list[tuple[int, int, int, int]] = []  # (pass, shard, taken, last_offset) still to read
        self.item_pass = first_pass  # the pass of the shard being read
        self.shard = NO_SHARD  # the shard being read, NO_SHARD between shards
        self.taken = 0  # samples taken from it so far
        self.last_offset = 0  # where the last of them starts
        self.reader: Iterator[dict] | None = None
        self.empty_in_a_row = 0
        self.read_errors = 0  # since the last take_read_errors()

    def next(self) -> dict:
        if len(self.buffer) > self.buffer_size:  # carried over from more streams: drain to size first
            slot = self.rng.randrange(len(self.buffer))
            self.origins[slot], self.origins[-1] = self.origins[-1], self.origins[slot]
            self.buffer[slot], self.buffer[-1] = self.buffer[-1], self.buffer[slot]
            self.origins.pop()
            return self.buffer.pop()
        while len(self.buffer) < self.buffer_size:
            origin, sample = self._next_from_shards()
            self.origins.append(origin)
            self.buffer.append(sample)
        origin, sample = self._next_from_shards()
        slot = self.rng.randrange(self.buffer_size)
        leaving = self.buffer[slot]
        self.buffer[slot], self.origins[slot] = sample, origin
        return leaving

    def take_read_errors(self) -> int:
        count, self.read_errors = self.read_errors, 0
        return count

    def _next_from_shards(self) -> tuple[tuple[int, int, int], dict]:
        while True:
            try:
                if self.reader is None:
                    self._open_next()
                sample = next(self.reader)
            except StopIteration:
                self._end_shard()
                continue
            except Exception as err:  # noqa: BLE001 - a bad shard must not kill a multi-day run
                self.read_errors += 1
                log.warning("skipping the rest of shard %s after a read error: %s", self.urls[self.shard], err)
                self._end_shard()
                continue
            origin = (self.shard, self.taken, sample[OFFSET])
            self.taken, self.last_offset = self.taken + 1, sample[OFFSET]
            return origin, sample

    def _open_next(self) -> None:
        """The next work item; at the end of the queue, this stream's share of the next pass."""
        if not self.queue:
            self.pass_index += 1
            shards = pass_shards(len(self.urls), self.seed, self.pass_index, self.stream, self.streams)
            self.queue = [(self.pass_index, shard, 0, 0) for shard in shards]
        self.item_pass, self.shard, self.taken, self.last_offset = self.queue.pop(0)
        self.reader = self._reader_after_taken()

    def _end_shard(self) -> None:
        self.empty_in_a_row = 0 if self.taken else self.empty_in_a_row + 1
        if self.empty_in_a_row >= MAX_EMPTY_SHARDS_IN_A_ROW:
            raise RuntimeError(f"{self.empty_in_a_row} shards in a row gave no sample (last "
                               f"{self.urls[self.shard]!r}); check data.train_shards")
        self.reader, self.shard = None, NO_SHARD

    # --- position ------------------------------------------------------------------------------
    def work(self) -> list[tuple[int, int, int, int]]:
        """(pass, shard, taken, last_offset) of everything this stream has yet to read, in order."""
        current = [(self.item_pass, self.shard, self.taken, self.last_offset)] if self.shard != NO_SHARD else []
        return current + list(self.queue)

    def state(self) -> dict:
        """Plain values and tensors (checkpoints load with torch.load(weights_only=True))."""
        return {"rng": random_state(self.rng), "pass": self.pass_index, "empty_in_a_row": self.empty_in_a_row,
                "work": torch.tensor(self.work(), dtype=torch.int64).reshape(-1, 4),
                "origins": torch.tensor(self.origins, dtype=torch.int64).reshape(-1, 3)}

    def restore(self, state: dict) -> None:
        set_random_state(self.rng, state["rng"])
        self.empty_in_a_row = int(state["empty_in_a_row"])
        self.carry_on([tuple(origin) for origin in state["origins"].tolist()],
                      [tuple(item) for item in state["work"].tolist()], int(state["pass"]))

    def carry_on(self, origins: list[tuple[int, int, int]], work: list[tuple[int, int, int, int]],
                 pass_index: int) -> None:
        """Continue from these buffered samples and work items; then the share of pass pass_index + 1."""
        samples = read_samples(self.urls, origins)
        kept = [origin for origin in origins if origin in samples]
        if len(kept) < len(origins):
            log.warning("%d of %d buffered samples could not be read again (shards changed?): the data order "
                        "after this resume differs from an uninterrupted run", len(origins) - len(kept), len(origins))
        self.buffer, self.origins = [samples[origin] for origin in kept], kept
        self.queue, self.pass_index = list(work), pass_index
        self.reader, self.shard = None, NO_SHARD

    def _reader_after_taken(self) -> Iterator[dict]:
        """The shard's samples after the first `taken` (all of them when none was taken)."""
        url = self.urls[self.shard]
        if self.taken == 0:
            return read_shard(url)
        if seekable(url):
            reader = read_shard(url, start=self.last_offset)
            next(reader)  # the last sample taken
        else:
            reader = read_shard(url)
            for _ in range(self.taken):
                next(reader)
        return reader


def read_samples(urls: list[str], origins: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], dict]:
    """The samples at the given origins, reading each shard once: at their offsets in a plain .tar
    file, else in order and only as far as needed."""
    wanted: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for origin in origins:
        wanted[origin[0]].append(origin)
    found = {}
    for shard, shard_origins in wanted.items():
        try:
            if seekable(urls[shard]):
                at = read_samples_at(urls[shard], [offset for _, _, offset in shard_origins])
                found.update({origin: at[origin[2]] for origin in shard_origins if origin[2] in at})
            else:
                found.update(read_in_order(urls[shard], shard_origins))
        except Exception as err:  # noqa: BLE001 - reported as missing samples by the caller
            log.warning("re-reading shard %s for a resume failed: %s", urls[shard], err)
    return found


def read_in_order(url: str, origins: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], dict]:
    by_ordinal = {origin[1]: origin for origin in origins}
    found, last = {}, max(by_ordinal)
    for ordinal, sample in enumerate(read_shard(url)):
        if ordinal in by_ordinal:
            found[by_ordinal[ordinal]] = sample
        if ordinal == last:
            break
    return found
