"""Fashion-MNIST preparation: our IDX parser and the ImageNet-shaped folder it produces."""
import gzip
import struct
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mokd_scale.tools import make_shards, prepare_fashion_mnist


def write_idx(path: Path, array: np.ndarray, type_code: int, compress=True):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


def test_read_idx_uint8_images_and_big_endian_int32(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "img.gz", images, 0x08)
    np.testing.assert_array_equal(prepare_fashion_mnist.read_idx(tmp_path / "img.gz"), images)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    write_idx(tmp_path / "ints", ints, 0x0C, compress=False)
    np.testing.assert_array_equal(prepare_fashion_mnist.read_idx(tmp_path / "ints"), ints)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        prepare_fashion_mnist.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 2, 2), np.uint8), 0x08, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        prepare_fashion_mnist.read_idx(tmp_path / "short")


def write_fake_fashion_mnist(source: Path, n_train: int, n_val: int, make_images) -> None:
    """IDX files as Debian's package ships them; make_images(labels) gives (n, 28, 28) uint8."""
    source.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", make_images(labels), 0x08)
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x08)


def fake_fashion_mnist(source: Path, n_train=30, n_val=20):
    rng = np.random.default_rng(0)

    def noise_with_marker(labels):
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels * 20  # a marker pixel, to check images keep their labels
        return images

    write_fake_fashion_mnist(source, n_train, n_val, noise_with_marker)


def test_prepare_writes_imagenet_layout_with_subsets(tmp_path):
    fake_fashion_mnist(tmp_path / "src")
    out = tmp_path / "fm"
    written = prepare_fashion_mnist.prepare(tmp_path / "src", out, train_per_class=2, val_per_class=1, size=32)
    assert written == {"train": 20, "val": 10}
    for split, per_class in (("train", 2), ("val", 1)):
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == [f"n{c:08d}" for c in range(10)]
        for label, folder in enumerate(folders):
            files = sorted((out / split / folder).glob("*.JPEG"))
            assert len(files) == per_class
            image = Image.open(files[0])
            assert image.mode == "RGB" and image.size == (32, 32)
    first_line = (out / "classes.txt").read_text().splitlines()[0]
    assert first_line == "n00000000 T-shirt/top"
    # Same settings: reused; other settings: rebuilt without stale files.
    assert prepare_fashion_mnist.prepare(tmp_path / "src", out, 2, 1, 32) == written
    assert prepare_fashion_mnist.prepare(tmp_path / "src", out, 1, 1, 0)["train"] == 10
    assert len(list((out / "train").rglob("*.JPEG"))) == 10
    assert Image.open(next((out / "val").rglob("*.JPEG"))).size == (28, 28)


def test_labels_follow_their_images(tmp_path):
    fake_fashion_mnist(tmp_path / "src")
    out = tmp_path / "fm"
    prepare_fashion_mnist.prepare(tmp_path / "src", out, 0, 0, size=0, quality=100)
    for path in (out / "train").rglob("*.JPEG"):
        label = int(path.parent.name[1:])
        marker = np.asarray(Image.open(path))[0, 0, 0]
        assert abs(int(marker) - label * 20) <= 12, path  # JPEG is lossy, but not by a class


def test_missing_package_names_the_apt_command(tmp_path, capsys):
    code = prepare_fashion_mnist.main(["--source", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def striped_fashion_mnist(source: Path, n_train=60, n_val=30):
    """Class c = a bright band at rows 2c..2c+3 plus noise: trivially separable by pixels."""
    rng = np.random.default_rng(1)

    def noise_with_band(labels):
        images = rng.integers(0, 40, (len(labels), 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label + 4:2 * label + 8] = 230
        return images

    write_fake_fashion_mnist(source, n_train, n_val, noise_with_band)


class Pixels(torch.nn.Module):
    """A 'backbone' whose pooled feature is the image itself."""

    def forward(self, images):
        return images.flatten(1)


@pytest.mark.integration
def test_prepared_folder_through_make_shards_and_the_knn_probe(tmp_path):
    """The demo's data path end to end: labels survive folder -> shards -> eval loader -> k-NN."""
    from mokd_scale.config import load_config
    from mokd_scale.eval.knn import evaluate_knn

    striped_fashion_mnist(tmp_path / "src")
    root = tmp_path / "fm"
    prepare_fashion_mnist.prepare(tmp_path / "src", root, 0, 0, size=32)
    for split in ("train", "val"):
        assert make_shards.main(["--imagenet-root", str(root), "--split", split, "--out", str(tmp_path / "shards"),
                                 "--samples-per-shard", "16", "--workers", "1"]) == 0
    cfg = load_config("tiny_cpu", ["data.source=shards", f"data.train_shards={tmp_path}/shards/imagenet-train.json",
                                   f"data.val_shards={tmp_path}/shards/imagenet-val.json", "data.workers=0",
                                   "eval.max_train_samples=0", "eval.max_val_samples=0", "eval.knn_k=3"])
    result = evaluate_knn({"pixels": Pixels()}, cfg, 0, 1, torch.device("cpu"))
    assert result == {"pixels": {"top1": 100.0, "top5": 100.0}}
    # The same shards through the k-NN command on a checkpoint of the recipe: one JSON, printed and --out.
    import json
    import os
    import subprocess
    import sys

    from mokd_scale.models import build_network
    from tests.test_export import write_fake_checkpoint

    networks = {n: build_network(cfg, n) for n in ("a", "b")}
    write_fake_checkpoint(tmp_path / "run", cfg, networks, step=7)
    out = tmp_path / "eval" / "knn.json"
    done = subprocess.run([sys.executable, "-m", "mokd_scale.tools.eval_knn", "--checkpoint", str(tmp_path / "run"),
                           "--out", str(out), "--set", "eval.knn_k=3"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    assert printed["step"] == 7 and printed["tag"] == "step_00000007" and not printed["random_init"]
    assert all(0.0 <= printed[n]["top1"] <= printed[n]["top5"] <= 100.0 for n in ("a", "b"))


def test_demo_reuses_shards_of_the_same_data_and_rebuilds_those_of_other_settings(tmp_path, monkeypatch):
    import json

    from mokd_scale.tools import demo

    def make_shards_in_process(command, what, **kwargs):
        args = [str(c) for c in command[command.index("mokd_scale.tools.make_shards") + 1:]]
        assert make_shards.main(args) == 0, what

    monkeypatch.setattr(demo, "run", make_shards_in_process)
    fake_fashion_mnist(tmp_path / "src")
    data, shards = tmp_path / "fm", tmp_path / "shards"

    def prepare_and_shard(train_per_class):
        args = types.SimpleNamespace(source=tmp_path / "src", train_per_class=train_per_class, val_per_class=1,
                                     image_size=32)
        written = demo.prepare_data(args, data)
        index = demo.make_shards(data, shards, written, nproc=1)["train"]
        return json.loads(index.read_text())["total"], index.stat().st_mtime_ns

    total, written_at = prepare_and_shard(2)
    assert total == 20 and prepare_and_shard(2) == (20, written_at)  # reused, not rewritten
    assert prepare_and_shard(1)[0] == 10  # fewer images prepared: the shards follow them
