"""mokd-shards (mokd_scale.tools.make_shards): ImageNet folder tree -> deterministic, resumable WebDataset shards."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mokd_scale.shards.imagenet_folder import SourceImage, list_split, to_rgb_jpeg
from mokd_scale.tools import make_shards
from tests.imagenet_fixture import (READABLE_KINDS, SKIPPED_KINDS, devkit_ids, make_imagenet_root,
                                    read_fixture_manifest)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "make_shards.py"  # the wrapper the README and the cluster guide name


def convert(root, out, split="train", **options) -> int:
    """Run the tool in-process; options become --flags (later flags override the defaults here)."""
    argv = ["--imagenet-root", str(root), "--split", split, "--out", str(out),
            "--samples-per-shard", "4", "--workers", "1"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return make_shards.main(argv)


def run_cli(*args, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60, **popen)


def read_index(out, split="train") -> dict:
    return json.loads((Path(out) / f"imagenet-{split}.json").read_text())


def read_samples(out, split="train") -> dict[str, dict]:
    """{key: {"cls": bytes, "jpg": bytes, "json": dict}} from the shards the index lists, in order."""
    samples = {}
    for shard in read_index(out, split)["shardlist"]:
        with tarfile.open(Path(out) / shard["url"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert not samples.get(key, {}).get(ext), f"duplicate member {member.name}"
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for sample in samples.values():
        sample["json"] = json.loads(sample["json"])
    return samples


def file_states(folder) -> dict[str, tuple]:
    """name -> (sha256, inode, mtime_ns) of every file in folder, hidden ones included."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_ino,
                                         p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def output_bytes(folder) -> dict[str, str]:
    """sha256 of the visible outputs (shards and index)."""
    return {name: state[0] for name, state in file_states(folder).items() if not name.startswith(".")}


def test_train_round_trip_keeps_labels_bytes_and_handles_every_quirk(tmp_path, capsys):
    root = make_imagenet_root(tmp_path)
    manifest = read_fixture_manifest(root)
    assert convert(root, tmp_path / "out") == 0
    samples, index = read_samples(tmp_path / "out"), read_index(tmp_path / "out")

    readable = {e["filename"]: e for e in manifest["train"] if e["kind"] in READABLE_KINDS}
    assert sorted(s["json"]["filename"] for s in samples.values()) == sorted(readable)
    for key, sample in samples.items():
        entry = readable[sample["json"]["filename"]]
        assert "." not in key
        assert sample["cls"] == str(entry["label"]).encode("ascii")
        assert (sample["json"]["label"], sample["json"]["wnid"]) == (entry["label"], entry["wnid"])
        assert manifest["classes"][entry["label"]] == entry["wnid"]
        source = (root / entry["filename"]).read_bytes()
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", Image.open(io.BytesIO(source)).size)
        if entry["kind"] in ("rgb", "dotted"):
            assert sample["jpg"] == source and sample["json"]["reencoded"] is None
        else:  # re-encoded: same picture (not inverted CMYK, not garbage), as PIL decodes the source
            assert sample["jpg"] != source and sample["json"]["reencoded"]
            expected = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"), dtype=np.float32)
            assert np.abs(np.asarray(image, dtype=np.float32) - expected).mean() < 4
    dotted = next(e for e in readable.values() if e["kind"] == "dotted")
    assert Path(dotted["filename"]).name.count(".") == 2
    assert dotted["filename"] in [s["json"]["filename"] for k, s in samples.items() if k.endswith("_extra")]

    gray = next(s for s in samples.values() if readable[s["json"]["filename"]]["kind"] == "gray")
    pixels = np.asarray(Image.open(io.BytesIO(gray["jpg"])), dtype=np.int16)
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 3 and pixels.std() > 10

    assert index["reencoded_by_reason"] == {"PNG file": 1, "mode CMYK": 1, "mode L": 1}
    skipped = {e["filename"]: e["kind"] for e in manifest["train"] if e["kind"] in SKIPPED_KINDS}
    reasons = {s["filename"]: s["reason"] for s in index["skipped"]}
    assert sorted(reasons) == sorted(skipped)
    for filename, kind in skipped.items():
        assert {"truncated": "truncated", "empty": "empty", "stray": "stray"}[kind] in reasons[filename]
    summary = capsys.readouterr().out
    assert all(filename in summary for filename in skipped) and "re-encoded to RGB JPEG: 3" in summary

    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert index["name"] == "imagenet-train"
    assert index["classes"] == manifest["classes"] and index["total"] == len(readable)
    assert sum(s["nsamples"] for s in index["shardlist"]) == len(readable)
    for shard in index["shardlist"]:
        data = (tmp_path / "out" / shard["url"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["filesize"], shard["sha256"])
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # headers that would make bytes vary
            assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()} == {(0, 0, 0, "", "")}


def test_webdataset_groups_each_sample_under_one_key(tmp_path):
    import webdataset

    root = make_imagenet_root(tmp_path)
    convert(root, tmp_path / "out")
    urls = [str(tmp_path / "out" / s["url"]) for s in read_index(tmp_path / "out")["shardlist"]]
    loaded = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert sorted(s["__key__"] for s in loaded) == sorted(read_samples(tmp_path / "out"))
    assert all({"cls", "jpg", "json"} <= set(s) for s in loaded)


def test_shard_sizes_are_balanced():
    assert make_shards.balanced_sizes(10, 4) == [4, 3, 3]
    assert make_shards.balanced_sizes(1001, 1000) == [501, 500]
    assert make_shards.balanced_sizes(8, 4) == [4, 4]
    assert make_shards.balanced_sizes(3, 1000) == [3]
    for total in range(1, 60):
        for per_shard in range(1, 12):
            sizes = make_shards.balanced_sizes(total, per_shard)
            assert sum(sizes) == total and max(sizes) - min(sizes) <= 1 and max(sizes) <= per_shard
            assert len(sizes) == -(-total // per_shard)


def test_planned_shards_are_balanced_and_skips_only_shorten_their_shard(tmp_path):
    root = make_imagenet_root(tmp_path, per_class=7)  # 23 images listed, 2 of them unreadable
    assert convert(root, tmp_path / "out", samples_per_shard=6) == 0
    unreadable = {s["filename"] for s in read_index(tmp_path / "out")["skipped"] if "stray" not in s["reason"]}
    planned = [[s.relpath for s in shard] for shard in _plan(root, samples_per_shard=6)]
    assert [len(shard) for shard in planned] == [6, 6, 6, 5] and len(unreadable) == 2
    counts = [s["nsamples"] for s in read_index(tmp_path / "out")["shardlist"]]
    assert counts == [len(set(shard) - unreadable) for shard in planned]


def test_safe_keys_have_no_dots_and_are_unique():
    images = [SourceImage(f"train/n1/{name}", "n1", 0)
              for name in ("a.b.JPEG", "a_b.JPEG", "a b.jpg", "x.JPEG", "x.png")]
    assert make_shards.safe_keys(images) == ["a_b", "a_b_2", "a_b_3", "x", "x_2"]


def test_output_is_byte_identical_across_runs_and_worker_counts(tmp_path):
    root = make_imagenet_root(tmp_path)
    assert convert(root, tmp_path / "one", workers=1) == 0
    assert convert(root, tmp_path / "two", workers=2) == 0
    cli = run_cli("--imagenet-root", root, "--split", "train", "--out", tmp_path / "cli",
                  "--samples-per-shard", 4, "--workers", 2)
    assert cli.returncode == 0, cli.stderr
    assert "[imagenet-train] shards 5/5" in cli.stderr and "img/s" in cli.stderr
    reference = output_bytes(tmp_path / "one")
    assert len(reference) == 6  # 5 shards + index
    assert output_bytes(tmp_path / "two") == reference
    assert output_bytes(tmp_path / "cli") == reference

    assert convert(root, tmp_path / "seed1", seed=1) == 0
    keys_seed0 = list(read_samples(tmp_path / "one"))
    keys_seed1 = list(read_samples(tmp_path / "seed1"))
    assert sorted(keys_seed0) == sorted(keys_seed1) and keys_seed0 != keys_seed1


def test_rerun_after_simulated_crashes_redoes_only_unfinished_shards(tmp_path):
    root = make_imagenet_root(tmp_path)
    convert(root, tmp_path / "clean")
    work = tmp_path / "work"
    convert(root, work)
    state = work / ".imagenet-train.state"
    (work / "imagenet-train-000001.tar").unlink()  # killed while writing shard 1 ...
    (work / ".imagenet-train-000001.tar.tmp-99999").write_bytes(b"half a tar")  # ... leaving its temp file
    (state / "imagenet-train-000002.json").unlink()  # killed after renaming shard 2, before its record
    with open(work / "imagenet-train-000003.tar", "r+b") as f:  # damaged later (e.g. partial copy)
        f.truncate(5000)
    (work / "imagenet-train.json").unlink()  # killed before the index
    before = file_states(work)

    assert convert(root, work) == 0
    after = file_states(work)
    assert output_bytes(work) == output_bytes(tmp_path / "clean")
    assert ".imagenet-train-000001.tar.tmp-99999" not in after
    for kept in ("imagenet-train-000000.tar", "imagenet-train-000004.tar"):
        assert after[kept] == before[kept]  # same bytes, inode and mtime: not rewritten
    for redone in ("imagenet-train-000002.tar", "imagenet-train-000003.tar"):
        assert after[redone][1:] != before[redone][1:]


def _plan(root, samples_per_shard: int, split: str = "train") -> list[list]:
    args = make_shards.parse_args(["--imagenet-root", str(root), "--split", split, "--out", "unused",
                                   "--samples-per-shard", str(samples_per_shard)])
    classes = make_shards.resolve_classes(root, split, Path("unused"))
    return make_shards.make_plan(list_split(root, split, classes)[0], classes, args)[0]


def _shard_of(root, relpath: str, samples_per_shard: int) -> tuple[int, int]:
    """(index of the shard that relpath is planned into, number of shards)."""
    shards = _plan(root, samples_per_shard)
    return next(n for n, shard in enumerate(shards) if relpath in [s.relpath for s in shard]), len(shards)


COPIED_IMAGE = "train/n01443537/n01443537_10.JPEG"


def _pick_middle_shard_file(root) -> tuple[str, int, int]:
    """Add a copy of an image under a name that the plan puts neither in the first nor the last shard."""
    for number in range(900, 950):
        relpath = f"train/n01443537/n01443537_{number}.JPEG"
        shutil.copy(root / COPIED_IMAGE, root / relpath)
        shard, num_shards = _shard_of(root, relpath, 2)
        if 0 < shard < num_shards - 1:
            return relpath, shard, num_shards
        (root / relpath).unlink()
    raise AssertionError("no name lands in a middle shard")


@pytest.mark.integration
def test_killed_conversion_resumes_to_the_same_bytes(tmp_path):
    """A real SIGKILL: a named pipe stands in for an image on a hung file system, so the
    process is deterministically stuck inside a middle shard when it is killed."""
    root = make_imagenet_root(tmp_path)
    blocker, blocked_shard, num_shards = _pick_middle_shard_file(root)
    (root / blocker).unlink()
    os.mkfifo(root / blocker)

    work = tmp_path / "work"
    process = subprocess.Popen([sys.executable, "-m", "mokd_scale.tools.make_shards", "--imagenet-root", str(root), "--split", "train",
                                "--out", str(work), "--samples-per-shard", "2", "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    temp = work / f".imagenet-train-{blocked_shard:06d}.tar.tmp-{process.pid}"
    deadline = time.monotonic() + 30
    while not temp.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and temp.exists()
    done_before = file_states(work)
    assert f"imagenet-train-{blocked_shard - 1:06d}.tar" in done_before
    assert f"imagenet-train-{blocked_shard:06d}.tar" not in done_before

    (root / blocker).unlink()
    shutil.copy(root / COPIED_IMAGE, root / blocker)  # the file system recovered
    assert convert(root, work, samples_per_shard=2) == 0
    convert(root, tmp_path / "clean", samples_per_shard=2)
    assert output_bytes(work) == output_bytes(tmp_path / "clean")
    after = file_states(work)
    assert not temp.exists() and len(read_index(work)["shardlist"]) == num_shards
    for shard in range(blocked_shard):
        name = f"imagenet-train-{shard:06d}.tar"
        assert after[name] == done_before[name]


@pytest.mark.parametrize("change", [{"seed": 1}, {"samples_per_shard": 5}, {"limit": 7}, "new input file"])
def test_changed_plan_against_existing_output_is_refused_untouched(tmp_path, capsys, change):
    root = make_imagenet_root(tmp_path)
    convert(root, tmp_path / "out")
    before = file_states(tmp_path / "out")
    capsys.readouterr()
    if change == "new input file":
        shutil.copy(root / "train/n01484850/n01484850_10.JPEG", root / "train/n01484850/n01484850_99.JPEG")
        change = {}
    assert convert(root, tmp_path / "out", **change) == 2
    message = capsys.readouterr().err
    assert "another plan" in message and "fresh --out" in message and str(tmp_path / "out") in message
    for name, value in change.items():
        assert name in message
    assert file_states(tmp_path / "out") == before


def test_existing_shards_without_plan_record_are_refused(tmp_path, capsys):
    root = make_imagenet_root(tmp_path)
    convert(root, tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / ".imagenet-train.state")
    before = file_states(tmp_path / "out")
    assert convert(root, tmp_path / "out") == 2
    assert "no plan record" in capsys.readouterr().err
    assert file_states(tmp_path / "out") == before


def test_val_folders_csv_and_devkit_give_the_same_labels(tmp_path):
    labels = {}
    for layout in ("folders", "csv", "devkit"):
        root = make_imagenet_root(tmp_path / layout, val_layout=layout)
        assert convert(root, tmp_path / layout / "out", split="val") == 0
        samples = read_samples(tmp_path / layout / "out", "val")
        expected = {e["filename"]: e for e in read_fixture_manifest(root)["val"]}
        for sample in samples.values():
            entry = expected[sample["json"]["filename"]]
            assert (int(sample["cls"]), sample["json"]["wnid"]) == (entry["label"], entry["wnid"])
        labels[layout] = {key: int(s["cls"]) for key, s in samples.items()}
        assert read_index(tmp_path / layout / "out", "val")["skipped"][0]["filename"].endswith("10.JPEG")
    classes = read_fixture_manifest(root)["classes"]
    ids = devkit_ids(classes)
    assert [ids[w] for w in classes] != sorted(ids.values())  # devkit ids really differ from labels
    assert labels["folders"] == labels["csv"] == labels["devkit"]
    assert len(labels["folders"]) == 9 and set(labels["folders"].values()) == {0, 1, 2}


def test_val_takes_classes_from_the_train_index_when_train_folder_is_absent(tmp_path):
    root = make_imagenet_root(tmp_path, val_layout="csv")
    convert(root, tmp_path / "out")
    shutil.rmtree(root / "train")
    assert convert(root, tmp_path / "out", split="val") == 0
    expected = {e["filename"]: e["label"] for e in read_fixture_manifest(root)["val"]}
    for sample in read_samples(tmp_path / "out", "val").values():
        assert int(sample["cls"]) == expected[sample["json"]["filename"]]
    assert convert(root, tmp_path / "fresh", split="val") == 2
    assert not (tmp_path / "fresh").exists()


def test_resize_short_side_shrinks_only_larger_images_and_keeps_aspect(tmp_path):
    root = make_imagenet_root(tmp_path)
    assert convert(root, tmp_path / "out", resize_short_side=250) == 0
    resized = passed = 0
    for sample in read_samples(tmp_path / "out").values():
        source = (root / sample["json"]["filename"]).read_bytes()
        width, height = Image.open(io.BytesIO(source)).size
        out = Image.open(io.BytesIO(sample["jpg"]))
        if min(width, height) > 250:
            resized += 1
            assert min(out.size) == 250 and "resized" in sample["json"]["reencoded"]
            assert abs(out.size[0] / out.size[1] - width / height) < 0.01
        else:
            passed += 1
            assert out.size == (width, height)
            assert (sample["jpg"] == source) == (sample["json"]["reencoded"] is None)
    assert resized and passed


def test_clear_errors_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(tmp_path / "missing", out) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert(tmp_path / "empty", out) == 2
    assert "missing or empty" in capsys.readouterr().err

    root = make_imagenet_root(tmp_path, val_layout="csv")
    (root / "LOC_val_solution.csv").unlink()
    assert convert(root, out, split="val") == 2
    message = capsys.readouterr().err
    assert str(root / "val") in message and "LOC_val_solution.csv" in message and "meta.mat" in message
    assert not out.exists()

    with pytest.raises(SystemExit) as exit_info:
        convert(root, out, split="test")
    assert exit_info.value.code == 2 and "invalid choice: 'test'" in capsys.readouterr().err
    assert not out.exists()


def test_devkit_files_are_also_found_directly_in_root(tmp_path):
    root = make_imagenet_root(tmp_path, val_layout="devkit")
    for name in ("ILSVRC2012_validation_ground_truth.txt", "meta.mat"):
        shutil.move(root / "ILSVRC2012_devkit_t12" / "data" / name, root / name)
    assert convert(root, tmp_path / "out", split="val") == 0
    expected = {e["filename"]: e["label"] for e in read_fixture_manifest(root)["val"]}
    samples = read_samples(tmp_path / "out", "val")
    assert len(samples) == 9
    assert all(int(s["cls"]) == expected[s["json"]["filename"]] for s in samples.values())


def test_transparent_png_is_flattened_on_white():
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 20, 30))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    jpeg, why = to_rgb_jpeg(buffer.getvalue())
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)), dtype=np.int16)
    assert why == "PNG file, mode RGBA" and pixels.shape == (30, 40, 3)
    assert (pixels[:, 25:] > 245).all() and abs(pixels[5, 5, 0] - 200) < 8


def test_a_second_concurrent_run_on_the_same_output_is_refused(tmp_path, capsys):
    import fcntl

    root = make_imagenet_root(tmp_path)
    convert(root, tmp_path / "out")
    before = file_states(tmp_path / "out")
    with open(tmp_path / "out" / ".imagenet-train.state" / "lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running conversion holds it
        assert convert(root, tmp_path / "out") == 2
    assert "another make_shards run" in capsys.readouterr().err
    assert file_states(tmp_path / "out") == before
