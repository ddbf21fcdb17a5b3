"""Data pipeline (single process): shard specs, multi-crop statistics and pixels, determinism,
corrupt samples, synthetic world-size invariance, eval splitting."""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from mokd_scale.config import load_config
from mokd_scale.data import build_eval_loader, build_train_loader, normalize_crops, resolve_shards
from mokd_scale.data import multicrop
from mokd_scale.data.eval_loader import ReaderPlan, reader_plan
from mokd_scale.data.multicrop import MultiCrop, crop_recipes, sample_crop_box, stack_crops
from mokd_scale.data.synthetic import SyntheticTrainStream

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photo_jpeg(index: int, size: tuple[int, int] | None = None) -> bytes:
    """A real photo, cropped/resized to a varied size (deterministic in `index`)."""
    photo = Image.fromarray(getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()).convert("RGB")
    width, height = size or (48 + 17 * (index % 5), 40 + 13 * (index % 4))
    left = (index * 37) % max(1, photo.width // 3)
    photo = photo.crop((left, 0, photo.width - left // 2, photo.height)).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_photo_shards(folder, num_shards: int, per_shard: int, corrupt: set[tuple[int, int]] = frozenset()):
    """Shards named photos-000000.tar... of samples {jpg, cls, json}; (shard, position) pairs in
    `corrupt` get truncated JPEG bytes. Returns (brace pattern, index JSON path, keys in order)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, keys = [], []
    for shard in range(num_shards):
        name = f"photos-{shard:06d}.tar"
        with tarfile.open(folder / name, "w") as archive:
            for position in range(per_shard):
                number = shard * per_shard + position
                key = f"sample{number:05d}"
                jpeg = photo_jpeg(number)
                if (shard, position) in corrupt:
                    jpeg = jpeg[: len(jpeg) // 3]
                _add_member(archive, f"{key}.jpg", jpeg)
                _add_member(archive, f"{key}.cls", str(number % 7).encode("ascii"))
                _add_member(archive, f"{key}.json", json.dumps({"n": number}).encode())
                keys.append(key)
        entries.append({"url": name, "nsamples": per_shard})
    index = folder / "index.json"
    index.write_text(json.dumps({"shardlist": entries}))
    pattern = str(folder / f"photos-{{000000..{num_shards - 1:06d}}}.tar")
    return pattern, str(index), keys


def tiny_config(*overrides: str):
    """tiny_cpu (32/16 px crops, 2 locals) with overrides, e.g. "data.workers=0"."""
    return load_config("tiny_cpu", ["data.workers=0", *overrides])


def tiny_data_cfg(*overrides: str):
    return tiny_config(*overrides).data


def batches_of(micro: int, global_batch: int, seed: int = 0) -> list[str]:
    return [f"train.micro_batch_size={micro}", f"train.global_batch_size={global_batch}", f"seed={seed}"]


def shard_config(train_shards: str, *overrides: str):
    return tiny_config("data.source=shards", f"data.train_shards={train_shards}", "data.shuffle_buffer=4", *overrides)


def shard_cfg(train_shards: str, *overrides: str):
    return shard_config(train_shards, *overrides).data


# ---------------------------------------------------------------- shard specs

def test_brace_pattern_and_index_json_resolve_to_the_same_shards(tmp_path):
    pattern, index, _ = write_photo_shards(tmp_path / "shards", num_shards=3, per_shard=2)
    from_pattern = resolve_shards(pattern)
    from_index = resolve_shards(index)
    assert from_pattern.urls == from_index.urls == [str(tmp_path / "shards" / f"photos-{i:06d}.tar")
                                                     for i in range(3)]
    assert from_pattern.nsamples is None and from_index.nsamples == [2, 2, 2]


def test_patterns_join_with_double_colon_and_take_wds_variables(tmp_path, monkeypatch):
    pattern, _, _ = write_photo_shards(tmp_path / "shards", num_shards=3, per_shard=1)
    first, rest = str(tmp_path / "shards" / "photos-000000.tar"), pattern.replace("{000000..", "{000001..")
    assert resolve_shards(f"{first}::{rest}").urls == resolve_shards(pattern).urls
    monkeypatch.setenv("WDS_SHARDS", str(tmp_path / "shards"))
    assert resolve_shards("${SHARDS}/photos-{000000..000002}.tar").urls == resolve_shards(pattern).urls


def test_index_json_urls_are_relative_to_the_json_folder(tmp_path, monkeypatch):
    _, index, _ = write_photo_shards(tmp_path / "a" / "shards", num_shards=1, per_shard=1)
    monkeypatch.chdir(tmp_path)  # a relative url must not depend on the working directory
    assert resolve_shards(index).urls == [str(tmp_path / "a" / "shards" / "photos-000000.tar")]


def test_bad_shard_specs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="data.train_shards is empty"):
        resolve_shards("")
    with pytest.raises(ValueError, match="do not exist"):
        resolve_shards(str(tmp_path / "x-{000..002}.tar"))
    (tmp_path / "bad.json").write_text('{"other": 1}')
    with pytest.raises(ValueError, match="shardlist"):
        resolve_shards(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------- multi-crop

def dino_cfg():
    return load_config("r50_vits16").data


def test_multicrop_gives_two_globals_then_locals_as_uint8():
    augment = MultiCrop.from_config(dino_cfg())
    crops = stack_crops([augment(photo_jpeg(i, (500, 375)), random.Random(i)) for i in range(2)])
    assert len(crops) == 10
    assert [tuple(c.shape) for c in crops] == [(2, 3, 224, 224)] * 2 + [(2, 3, 96, 96)] * 8
    assert all(c.dtype == torch.uint8 for c in crops)
    normalised = normalize_crops(crops, torch.device("cpu"), torch.float32, (0.5,) * 3, (0.25,) * 3)
    assert normalised[0].dtype == torch.float32
    assert torch.allclose(normalised[0], (crops[0].float() / 255 - 0.5) / 0.25, atol=1e-5)


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("width,height,scale", [(500, 375, (0.4, 1.0)), (500, 375, (0.05, 0.4)),
                                                (120, 400, (0.4, 1.0))])
def test_crop_boxes_have_torchvision_statistics(width, height, scale):
    draws = 3000
    rng = random.Random(0)
    ours = np.array([sample_crop_box(rng, width, height, scale) for _ in range(draws)], dtype=float)
    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    theirs = np.array([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
                       for _ in range(draws)], dtype=float)  # (top, left, h, w)
    theirs = theirs[:, [1, 0, 3, 2]]  # -> (left, top, w, h)
    # Area fraction, log aspect ratio and the box centre: KS distance well under the ~0.035
    # that 3000 + 3000 draws can show by chance at p = 0.05... and a wrong rule gives > 0.1.
    for column in (
        lambda b: b[:, 2] * b[:, 3] / (width * height),
        lambda b: np.log(b[:, 2] / b[:, 3]),
        lambda b: (b[:, 0] + b[:, 2] / 2) / width,
        lambda b: (b[:, 1] + b[:, 3] / 2) / height,
    ):
        assert ks_statistic(column(ours), column(theirs)) < 0.045


def test_crop_boxes_stay_inside_the_image():
    rng = random.Random(1)
    for width, height in [(500, 375), (30, 400), (400, 30), (1, 1)]:
        for _ in range(200):
            left, top, w, h = sample_crop_box(rng, width, height, (0.05, 1.0))
            assert 0 <= left and 0 <= top and 0 < w and 0 < h
            assert left + w <= width and top + h <= height


@pytest.mark.parametrize("op,theirs,factor", [
    (multicrop._brightness, TF.adjust_brightness, 1.37),
    (multicrop._brightness, TF.adjust_brightness, 0.61),
    (multicrop._contrast, TF.adjust_contrast, 1.3),
    (multicrop._contrast, TF.adjust_contrast, 0.7),
    (multicrop._saturation, TF.adjust_saturation, 1.15),
    (multicrop._hue, TF.adjust_hue, 0.07),
    (multicrop._hue, TF.adjust_hue, -0.093),
])
def test_colour_ops_equal_torchvision_pixel_for_pixel(op, theirs, factor):
    img = Image.open(io.BytesIO(photo_jpeg(1, (96, 80)))).convert("RGB")
    assert np.array_equal(np.asarray(op(img, factor)), np.asarray(theirs(img, factor)))


def test_hue_lookup_table_stays_close_to_the_exact_hue_shift():
    img = Image.open(io.BytesIO(photo_jpeg(0, (120, 100)))).convert("RGB")
    for shift in (-0.1, -0.031, 0.05, 0.099):
        error = np.abs(np.asarray(multicrop._hue_fast(img, shift)).astype(int) - np.asarray(TF.adjust_hue(img, shift)))
        assert error.mean() < 1.2 and np.percentile(error, 99) <= 5
    grey = Image.new("RGB", (8, 8), (90, 90, 90))  # no hue: a shift must leave grey alone
    assert np.array_equal(np.asarray(multicrop._hue_fast(grey, 0.08)), np.asarray(grey))


def test_torch_bicubic_crop_matches_pil_crop_resize():
    img = Image.open(io.BytesIO(photo_jpeg(0, (500, 375)))).convert("RGB")
    source = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)
    for box, size in [((10, 20, 300, 280), 224), ((200, 100, 150, 120), 96), ((0, 0, 64, 70), 96)]:
        left, top, w, h = box
        pil = np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC))
        ours = multicrop._resize_box(source, box, size)
        assert np.abs(pil.astype(int) - ours).mean() < 0.5


def test_reduced_jpeg_decode_keeps_the_crops(monkeypatch):
    """Locals-only recipe on a big photo: decoding at 1/2..1/8 must give nearly the crops of a full
    decode (a mis-scaled box would differ wildly)."""
    cfg = dino_cfg()
    recipes = [r for r in crop_recipes(cfg) if r.size == cfg.local_crop_size]
    big = photo_jpeg(2, (1600, 1200))
    reduced = MultiCrop(recipes)(big, random.Random(5))
    monkeypatch.setattr(multicrop, "_JPEG_REDUCTIONS", ())
    full = MultiCrop(recipes)(big, random.Random(5))
    assert multicrop._jpeg_reduction([multicrop._draw_plan(random.Random(5), r, 1600, 1200)
                                      for r in recipes], [r.size for r in recipes]) >= 1
    for a, b in zip(reduced, full):
        assert np.abs(a.astype(int) - b).mean() < 8


# ---------------------------------------------------------------- train loader (shards)

def first_batches(loader, count: int) -> list[dict]:
    return list(itertools.islice(iter(loader), count))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p["crops"], q["crops"]))


def test_train_batches_follow_the_contract(tmp_path):
    _, index, _ = write_photo_shards(tmp_path, num_shards=2, per_shard=4)
    loader = build_train_loader(shard_config(index, *batches_of(3, 6)), rank=0, world_size=2)
    batch = first_batches(loader, 1)[0]
    assert [tuple(c.shape) for c in batch["crops"]] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert batch["label"].shape == (3,) and batch["index"].tolist() == [-1, -1, -1]
    assert batch["skipped"] == 0 and loader.micro_batches_per_step == 1
    assert loader.steps_per_epoch == 10240 // 6  # tiny_cpu: samples_per_epoch 10240
    resumed = build_train_loader(shard_config(index, *batches_of(3, 6)), rank=0, world_size=2, start_step=3500)
    assert resumed.dataset.first_epoch == 2


def test_train_stream_is_deterministic_per_seed_epoch_rank_worker(tmp_path):
    _, index, _ = write_photo_shards(tmp_path, num_shards=3, per_shard=4)
    def batches(rank=0, seed=0, start_step=0, workers=0):
        config = shard_config(index, f"data.workers={workers}", *batches_of(2, 4, seed))
        return first_batches(build_train_loader(config, rank, 2, start_step), 3)

    reference = batches()
    assert same_batches(reference, batches())
    assert not same_batches(reference, batches(rank=1))
    assert not same_batches(reference, batches(seed=1))
    # A resumed run (start_step) draws fresh samples instead of replaying the first ones.
    assert not same_batches(reference, batches(start_step=5))
    two_workers = batches(workers=2)
    assert same_batches(two_workers, batches(workers=2))
    assert not same_batches(two_workers[:1], two_workers[1:2])  # worker 0 and worker 1 differ


def continue_after(config, position, start_step: int, count: int, folder: Path) -> tuple[list[dict], dict]:
    """Rank 1's batches of a loader resumed at `position`, through a checkpoint-like save/load."""
    path = folder / "position.pt"
    torch.save(position, path)
    loader = build_train_loader(config, 1, 2, start_step)
    loader.load_state_dict(torch.load(path, weights_only=True))
    batches = first_batches(loader, count)
    return batches, loader.state_dict()


@pytest.mark.parametrize("access", ["seek", "stream"])
def test_a_resumed_loader_continues_every_worker_stream_exactly(tmp_path, access):
    """Two workers (batches alternate between them), a shuffle buffer spanning shards, epochs of 3
    micro-batches per worker: stops after 1, 2 and 4 batches, and a second resume on top of the first.
    Plain .tar files are re-read at the samples' offsets, a pipe: URL from its start."""
    pattern, index, _ = write_photo_shards(tmp_path, num_shards=3, per_shard=4)
    spec = index if access == "seek" else f"pipe:cat {pattern}"
    config = shard_config(spec, "data.workers=2", "data.shuffle_buffer=5", "data.samples_per_epoch=24",
                          *batches_of(2, 8))
    straight = first_batches(build_train_loader(config, 1, 2), 9)
    for stop in (1, 2, 4):
        first = build_train_loader(config, 1, 2)
        consumed = first_batches(first, stop)
        resumed, position = continue_after(config, first.state_dict(), stop // 2, 2, tmp_path)
        assert resumed and same_batches(straight[:stop] + resumed, straight[:stop + 2]), stop
        again, _ = continue_after(config, position, (stop + 2) // 2, 9 - stop - 2, tmp_path)
        assert same_batches(consumed + resumed + again, straight), stop


def test_a_position_saved_with_other_settings_is_not_replayed(tmp_path, caplog):
    _, index, _ = write_photo_shards(tmp_path, num_shards=2, per_shard=4)
    first = build_train_loader(shard_config(index, "data.workers=2", *batches_of(2, 8)), 0, 2)
    first_batches(first, 1)
    loader = build_train_loader(shard_config(index, "data.workers=1", *batches_of(2, 8)), 0, 2, 1)
    loader.load_state_dict(first.state_dict())
    assert not loader.continued and "restart with fresh samples" in caplog.text


def labels_of(batches: list[dict]) -> list[int]:
    return [label for batch in batches for label in batch["label"].tolist()]


def test_a_run_resumed_on_fewer_ranks_hands_out_the_rest_of_the_pass_once(tmp_path, monkeypatch):
    """2 ranks stop mid-pass; 1 rank resumed from both ranks' saved positions hands out the samples they had
    not: none of the 2 ranks' samples again, none twice, and the rest of the pass waits in its shuffle buffer."""
    from mokd_scale.data import train_loader
    monkeypatch.setattr(train_loader, "label_of", lambda sample: int(sample["__key__"][len("sample"):]))
    per_shard, buffer_size = 5, 4
    _, index, keys = write_photo_shards(tmp_path, num_shards=6, per_shard=per_shard)
    config = shard_config(index, f"data.shuffle_buffer={buffer_size}", *batches_of(2, 4))
    stopped = [build_train_loader(config, rank, 2) for rank in (0, 1)]
    seen = labels_of([batch for loader in stopped for batch in first_batches(loader, 4)])
    torch.save([loader.state_dict() for loader in stopped], tmp_path / "positions.pt")
    resumed = build_train_loader(config, 0, 1, start_step=4)
    resumed.load_state_dicts_of_ranks(torch.load(tmp_path / "positions.pt", weights_only=True))
    assert resumed.carried
    # Of the rest of the pass, all but one buffer's worth come out before the next pass is read at all.
    rest = len(keys) - len(seen)
    assert (rest - buffer_size) % 2 == 0
    emitted = labels_of(first_batches(resumed, (rest - buffer_size) // 2))
    waiting = [shard * per_shard + ordinal for shard, ordinal, _ in resumed.positions[0]["samples"]["origins"].tolist()]
    assert len(waiting) == buffer_size
    assert sorted(seen + emitted + waiting) == list(range(len(keys)))


def test_the_epoch_is_part_of_the_seed(tmp_path):
    from mokd_scale.data.train_loader import ShardTrainStream
    _, index, _ = write_photo_shards(tmp_path, num_shards=3, per_shard=4)
    urls = resolve_shards(index).urls

    def batches(first_epoch):
        stream = ShardTrainStream(urls, shard_cfg(index), 2, rank=0, seed=0, start_step=0,
                                  first_epoch=first_epoch, batches_per_epoch_per_rank=1)
        return list(itertools.islice(iter(stream), 3))

    assert same_batches(batches(0), batches(0))
    assert not same_batches(batches(0)[:1], batches(1)[:1])


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    # One shard, its first sample truncated; shuffle_buffer=1 keeps stream order, so every
    # micro-batch of 4 consumes exactly one pass over the shard, corrupt sample included.
    _, index, _ = write_photo_shards(tmp_path, num_shards=1, per_shard=5, corrupt={(0, 0)})
    config = shard_config(index, "data.shuffle_buffer=1", "data.samples_per_epoch=400", *batches_of(4, 4))
    batches = first_batches(build_train_loader(config, 0, 1), 3)
    assert [b["skipped"] for b in batches] == [1, 1, 1]
    assert all(b["label"].shape == (4,) for b in batches)


def test_a_shard_list_with_no_readable_sample_fails_clearly(tmp_path):
    (tmp_path / "junk-0.tar").write_bytes(b"not a tar file at all" * 10)
    config = shard_config(str(tmp_path / "junk-{0..0}.tar"), *batches_of(2, 2))
    with pytest.raises(RuntimeError, match="gave no sample"):
        first_batches(build_train_loader(config, 0, 1), 1)


# ---------------------------------------------------------------- synthetic source

def synthetic_global_batch(world_size: int, step: int, cfg, global_batch=8, micro=2) -> dict:
    parts = []
    for rank in range(world_size):
        accumulation = global_batch // (world_size * micro)
        stream = SyntheticTrainStream(cfg, micro, accumulation, rank, world_size, seed=3, start_step=0)
        parts += [stream.batch(step * accumulation + m) for m in range(accumulation)]
    return {"index": torch.cat([p["index"] for p in parts]),
            "label": torch.cat([p["label"] for p in parts]),
            "crops": [torch.cat([p["crops"][c] for p in parts]) for c in range(len(parts[0]["crops"]))]}


def test_synthetic_global_batch_is_the_same_for_any_world_size():
    cfg = tiny_data_cfg("data.source=synthetic")
    one, two = synthetic_global_batch(1, step=2, cfg=cfg), synthetic_global_batch(2, step=2, cfg=cfg)
    assert one["index"].tolist() == list(range(16, 24)) == two["index"].tolist()
    assert torch.equal(one["label"], two["label"])
    assert all(torch.equal(a, b) for a, b in zip(one["crops"], two["crops"]))
    assert one["crops"][0].float().std() > 10  # not a blank image


def test_synthetic_loader_workers_keep_the_batch_order():
    config0 = tiny_config("data.source=synthetic", *batches_of(2, 8, seed=3))
    config2 = tiny_config("data.source=synthetic", "data.workers=2", *batches_of(2, 8, seed=3))
    a = first_batches(build_train_loader(config0, 1, 2, start_step=4), 4)
    b = first_batches(build_train_loader(config2, 1, 2, start_step=4), 4)
    # rank 1 of 2, step 4: indices 36..39, then step 5: 44..47.
    assert [x["index"].tolist() for x in a] == [[36, 37], [38, 39], [44, 45], [46, 47]]
    assert [x["index"].tolist() for x in b] == [x["index"].tolist() for x in a]
    assert same_batches(a, b)


# ---------------------------------------------------------------- eval loader

@pytest.mark.parametrize("shard_sizes,world_size,workers", [
    ([5], 2, 2), ([3, 4], 2, 1), ([3, 4], 2, 3), ([2, 3, 4], 2, 2), ([1] * 9, 4, 2), ([6, 0, 2], 3, 1)])
def test_reader_plans_cover_every_sample_exactly_once(shard_sizes, world_size, workers):
    seen = []
    for rank, worker in itertools.product(range(world_size), range(workers)):
        plan = reader_plan(len(shard_sizes), rank, world_size, worker, workers)
        stream = [(s, p) for s in plan.shard_numbers for p in range(shard_sizes[s])]
        seen += [item for position, item in enumerate(stream) if position % plan.modulo == plan.remainder]
    assert sorted(seen) == [(s, p) for s, n in enumerate(shard_sizes) for p in range(n)]


def test_reader_plan_splits_whole_shards_when_there_are_enough():
    assert reader_plan(8, rank=1, world_size=2, worker=0, workers=2) == ReaderPlan([1, 5], 1, 0)
    assert reader_plan(1, rank=1, world_size=2, worker=0, workers=1) == ReaderPlan([0], 2, 1)


def test_eval_loader_resizes_crops_and_normalises(tmp_path):
    pattern, index, _ = write_photo_shards(tmp_path, num_shards=2, per_shard=3)
    cfg = tiny_data_cfg("data.eval_resize=40", "data.eval_crop=32")
    batches = list(build_eval_loader(index, cfg, batch_size=4, rank=0, world_size=1))
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.float32
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(6))
    assert torch.cat([b["label"] for b in batches]).tolist() == [n % 7 for n in range(6)]
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    assert abs(float(images.mean())) < 3 and not torch.allclose(images[0], -mean)
    # A brace pattern carries no shard sizes: indices stay unique and in shard order.
    from_pattern = build_eval_loader(pattern, cfg, batch_size=4, rank=0, world_size=1)
    assert sorted(i for b in from_pattern for i in b["index"].tolist()) == [
        (shard << 32) + position for shard in range(2) for position in range(3)]


def test_eval_centre_crop_matches_torchvision_resize_and_crop():
    from mokd_scale.data.eval_loader import eval_pixels
    jpeg = photo_jpeg(3, (300, 200))
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    expected = np.asarray(TF.center_crop(TF.resize(img, 64, TF.InterpolationMode.BICUBIC), 56))
    ours = eval_pixels(jpeg, 64, 56)
    assert ours.shape == (56, 56, 3) and np.abs(ours.astype(int) - expected).mean() < 1.0


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.integration
def test_a_rank_that_stops_on_an_error_exits_though_its_workers_ignore_sigterm():
    """The rank ends its busy workers at exit (they ignore the SIGTERM multiprocessing would send them and then
    wait on): without that, a rank that crashed would hang and its job would never end."""
    code = ("from mokd_scale.config import load_config\n"
            "from mokd_scale.data import build_train_loader\n"
            "config = load_config('tiny_cpu', ['data.source=synthetic', 'data.workers=2'])\n"
            "batches = iter(build_train_loader(config, 0, 1))\n"
            "next(batches)\n"
            "raise RuntimeError('the step failed')\n")
    rank = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert rank.returncode == 1
    assert rank.stderr.strip().endswith("RuntimeError: the step failed"), rank.stderr[-2000:]


@pytest.mark.integration
def test_loader_workers_end_with_their_rank_and_leave_sigterm_to_it():
    """A worker ignores SIGTERM, which scancel sends to every process of the job: the rank saves a
    checkpoint on it, and needs its workers for that. A killed rank's loader worker must not outlive it:
    Slurm ends the job step only once the rank's output closes, and a live worker holds it open. Left alone, a busy worker (large images here)
    finishes the batches it was asked for, then notices its parent is gone within 5 s."""
    code = ("from mokd_scale.config import load_config\n"
            "from mokd_scale.data import build_train_loader\n"
            "config = load_config('tiny_cpu', ['data.source=synthetic', 'data.workers=1',\n"
            "                                  'data.synthetic_image_size=640'])\n"
            "batches = iter(build_train_loader(config, 0, 1))\n"
            "next(batches)\n"
            "print('ready', flush=True)\n"
            "import time; time.sleep(120)\n")
    rank = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert rank.stdout.readline().strip() == "ready"
        workers = [int(pid) for pid in Path(f"/proc/{rank.pid}/task/{rank.pid}/children").read_text().split()]
        assert workers and all(alive(pid) for pid in workers)
        for pid in workers:  # scancel signals every process of the job: the rank saves, its workers carry on
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(alive(pid) for pid in workers)
    finally:
        rank.kill()
        rank.wait()
    deadline = time.monotonic() + 2.5
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
