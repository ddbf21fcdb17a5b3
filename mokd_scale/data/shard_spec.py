"""Turn a shard spec (brace pattern or index JSON) into a list of shard URLs.

Two spellings are accepted, because clusters use both:
- a brace pattern, "dir/imagenet-train-{000000..000127}.tar", expanded by webdataset's own rules
  (several patterns may be joined with "::"; "${NAME}" takes the environment variable WDS_NAME);
- an index JSON as written by mokd-shards: {"shardlist": [{"url": ..., "nsamples": ...}, ...]},
  where a relative url is relative to the folder holding the JSON (so a shard folder can be moved whole).
"""
from __future__ import annotations

import dataclasses
import json
import os

from webdataset.shardlists import expand_urls

# URL schemes that webdataset's gopen can stream from; these are not checked for existence.
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")


@dataclasses.dataclass(frozen=True)
class ShardList:
    urls: list[str]
    # Samples per shard when the index JSON says so, else None (brace patterns carry no counts).
    nsamples: list[int] | None

    @property
    def total_samples(self) -> int | None:
        return None if self.nsamples is None else sum(self.nsamples)


def is_remote(url: str) -> bool:
    return url.startswith(_REMOTE_PREFIXES)


def _read_index_json(path: str) -> ShardList:
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"shard index {path!r} cannot be read as JSON ({err}); "
                         "write it with mokd-shards") from err
    entries = index.get("shardlist") if isinstance(index, dict) else None
    if not entries:
        raise ValueError(f"shard index {path!r} has no non-empty 'shardlist'; "
                         "expected {\"shardlist\": [{\"url\": ..., \"nsamples\": ...}, ...]}")
    folder = os.path.dirname(os.path.abspath(path))
    urls, counts = [], []
    for entry in entries:
        if "url" not in entry:
            raise ValueError(f"shard index {path!r}: entry {entry!r} has no 'url'")
        url = entry["url"]
        if not is_remote(url) and not os.path.isabs(url):
            url = os.path.join(folder, url)
        urls.append(url)
        counts.append(entry.get("nsamples"))
    has_all_counts = all(isinstance(c, int) for c in counts)
    return ShardList(urls=urls, nsamples=counts if has_all_counts else None)


def resolve_shards(spec: str, what: str = "data.train_shards") -> ShardList:
    """Resolve `spec` into shard URLs; `what` names the config key in error messages."""
    if not spec or not spec.strip():
        raise ValueError(f"{what} is empty: give an index JSON path or a brace pattern "
                         "like 'dir/train-{000000..000127}.tar'")
    spec = spec.strip()
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise ValueError(f"{what}: shard index {spec!r} does not exist")
        shards = _read_index_json(spec)
    else:
        shards = ShardList(urls=expand_urls(spec), nsamples=None)
    missing = [u for u in shards.urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise ValueError(f"{what}: {len(missing)} of {len(shards.urls)} shards do not exist, "
                         f"first {missing[0]!r}; check the pattern or run mokd-shards")
    return shards
