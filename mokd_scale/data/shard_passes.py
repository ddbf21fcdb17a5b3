"""Which shards each stream reads: passes over the shard list, and the rest of a pass carried onto
another number of streams.

Pass q orders all shards by a permutation drawn from (seed, q) and deals them to the run's streams
(every DataLoader worker of every rank is one stream): stream g of S reads the shards at places
g, g + S, g + 2S, ... of that order. Within a pass each shard is read by exactly one stream, once
(with fewer shards than streams, some streams share one). A stream that finishes its shards goes on
with its share of the next pass.

A work item is where a stream reads from: (pass, shard, taken, last_offset), the shard's samples after
the first `taken` (whose last starts at byte `last_offset`); (pass, shard, 0, 0) is the whole shard.
"""
from __future__ import annotations

import random

from mokd_scale.data.seeds import mixed_seed

PASS_SALT = 0x9A55  # keeps the pass order apart from the streams' other seeds


def pass_shards(num_shards: int, seed: int, pass_index: int, stream: int, streams: int) -> list[int]:
    """Stream `stream` of `streams`: its shards in pass `pass_index`, in reading order."""
    order = list(range(num_shards))
    random.Random(mixed_seed(seed, pass_index, PASS_SALT)).shuffle(order)
    return [order[place % num_shards] for place in range(stream, max(num_shards, streams), streams)]


def unread_work(saved: list[dict], num_shards: int, seed: int) -> tuple[list, dict, int]:
    """What the saved streams had not yet handed out: their buffered samples' origins, per pass the work
    items not yet read (the rest of the shards being read, the queues, and each stream's whole share of
    any later pass the furthest stream has begun), and that furthest pass. `saved` holds one
    ShardSampleStream.state() per old stream, in stream order ("pass": its last share taken, "work":
    (pass, shard, taken, last_offset) items, "origins")."""
    last_pass = max(int(stream["pass"]) for stream in saved)
    buffered = [tuple(origin) for stream in saved for origin in stream["origins"].tolist()]
    work: dict[int, list[tuple[int, int, int, int]]] = {}
    for index, stream in enumerate(saved):
        for item in stream["work"].tolist():
            work.setdefault(item[0], []).append(tuple(item))
        for later in range(int(stream["pass"]) + 1, last_pass + 1):
            shards = pass_shards(num_shards, seed, later, index, len(saved))
            work.setdefault(later, []).extend((later, shard, 0, 0) for shard in shards)
    return buffered, work, last_pass


def share_of(buffered: list, work: dict, stream: int, streams: int) -> tuple[list, list]:
    """New stream `stream` of `streams`: its part of the buffered samples, and its work items (pass by pass,
    each pass's items dealt in turn over the streams)."""
    items = [item for pass_index in sorted(work) for item in work[pass_index][stream::streams]]
    return buffered[stream::streams], items
