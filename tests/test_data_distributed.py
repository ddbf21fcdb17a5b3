"""Data pipeline on 2 gloo ranks: equal step counts with few shards, eval splits exactly once."""
from __future__ import annotations

import itertools
import multiprocessing

import torch
import torch.distributed as dist

from mokd_scale.data import build_eval_loader, build_train_loader
from tests.dist_harness import run_on_ranks
from tests.test_data_pipeline import shard_config, tiny_data_cfg, write_photo_shards
import pytest

pytestmark = pytest.mark.integration


def allow_dataloader_workers() -> None:
    """Make this harness rank look like a torchrun rank to the DataLoader: the harness starts ranks
    as spawned daemon processes (a daemon may not start children, and spawn becomes the default
    start method, re-importing torch in every worker: ~20 s on a loaded CI box), while a torchrun
    rank is a fresh non-daemon process that forks its workers."""
    multiprocessing.current_process().daemon = False
    multiprocessing.set_start_method("fork", force=True)


def count_train_micro_batches(rank: int, world_size: int, shard_specs: list[str]) -> list[int]:
    """Per spec: every rank pulls two epochs' worth of micro-batches (2 workers each) and meets the
    others at an all-reduce after every step, as training does; returns the steps each rank made."""
    allow_dataloader_workers()
    steps_made = []
    for spec in shard_specs:
        config = shard_config(spec, "data.workers=2", "data.samples_per_epoch=16",
                              "train.global_batch_size=8", "train.micro_batch_size=2")
        loader = build_train_loader(config, rank=rank, world_size=world_size)
        batches = iter(loader)
        steps = 2 * loader.steps_per_epoch
        for _ in range(steps):
            micro = [next(batches) for _ in range(loader.micro_batches_per_step)]
            assert all(b["crops"][0].shape[0] == 2 for b in micro)
            done = torch.ones(1)
            dist.all_reduce(done)  # would hang if a rank ran dry
            assert done.item() == world_size
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
        dist.all_gather(counts, torch.tensor([steps]))
        steps_made.append([int(c) for c in counts])
    return steps_made


def gather_eval_indices(rank: int, world_size: int, shard_specs: list[str]) -> list[list[int]]:
    allow_dataloader_workers()
    seen = []
    for spec in shard_specs:
        cfg = tiny_data_cfg("data.workers=2", "data.eval_resize=36", "data.eval_crop=32")
        mine = [i for batch in build_eval_loader(spec, cfg, 2, rank, world_size)
                for i in batch["index"].tolist()]
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        seen.append(sorted(itertools.chain.from_iterable(everyone)))
    return seen


def train_and_eval_on_ranks(rank: int, world_size: int, train_specs: list[str], eval_specs: list[str]):
    # One set of rank processes for both checks: starting them is most of this test's time.
    return (count_train_micro_batches(rank, world_size, train_specs),
            gather_eval_indices(rank, world_size, eval_specs))


def test_two_ranks_make_equal_steps_with_few_shards_and_eval_each_sample_once(tmp_path):
    one_pattern, _, _ = write_photo_shards(tmp_path / "one", num_shards=1, per_shard=3)
    _, two_index, _ = write_photo_shards(tmp_path / "two", num_shards=2, per_shard=2)
    _, five_in_one, _ = write_photo_shards(tmp_path / "val1", num_shards=1, per_shard=5)
    _, nine_in_three, _ = write_photo_shards(tmp_path / "val3", num_shards=3, per_shard=3)
    steps, seen = run_on_ranks(train_and_eval_on_ranks, world_size=2, timeout=120,
                               args=([one_pattern, two_index], [five_in_one, nine_in_three]))
    # Train: 1 and 2 shards for 2 ranks x 2 workers; samples_per_epoch 16 / global batch 8 =
    # 2 steps per epoch, two epochs, the same on both ranks (and no hang at the all-reduces).
    assert steps == [[4, 4], [4, 4]]
    # Eval: fewer shards than ranks (split by sample) and more (split by shard), 2 workers each.
    assert seen == [list(range(5)), list(range(9))]
