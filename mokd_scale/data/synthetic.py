"""Synthetic training data: images and crops are pure functions of (seed, global sample index).

Used by tests and benchmarks that must not depend on I/O, and to check world-size invariance: at step s
the global batch is indices [s*G, (s+1)*G); rank r takes its slice [r*G/W, (r+1)*G/W), split into
micro-batches, and because nothing depends on the rank or worker, the global batch is identical for
any world size or worker count.

An image is a smooth random colour field (a 4x4 grid of random colours, upsampled) modulated by a
class-specific stripe pattern, so the classes are learnable (k-NN) and crops are not trivial.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mokd_scale.data.multicrop import MultiCrop, stack_crops
from mokd_scale.data.seeds import mixed_rng, mixed_seed

# Stream ids mixed into the seed so that an image's pixels and its augmentation draws are unrelated.
_PIXELS, _AUGMENT = 11, 12


@functools.lru_cache(maxsize=64)
def _class_pattern(label: int, num_classes: int, size: int) -> np.ndarray:
    """Stripes whose angle and frequency identify the class; values in [0.45, 1]."""
    angle = math.pi * label / max(1, num_classes)
    frequency = 2.0 + 3.0 * (label % 3)  # cycles per image
    coords = np.arange(size, dtype=np.float32) / size
    phase = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    return (0.725 + 0.275 * np.sin(2 * math.pi * frequency * phase)).astype(np.float32)


def synthetic_image(seed: int, image_id: int, size: int, num_classes: int) -> tuple[Image.Image, int]:
    """(RGB image, label) for one synthetic sample; label = image_id % num_classes."""
    label = image_id % num_classes
    rng = np.random.default_rng(mixed_seed(seed, image_id, _PIXELS))
    colours = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    field = np.asarray(colours.resize((size, size), Image.BICUBIC), dtype=np.float32)
    shift = rng.integers(0, size, 2)  # the pattern's position varies, its orientation does not
    pattern = np.roll(_class_pattern(label, num_classes, size), tuple(shift), axis=(0, 1))
    return Image.fromarray((field * pattern[:, :, None]).astype(np.uint8)), label


class SyntheticTrainStream(IterableDataset):
    """Endless micro-batches of synthetic samples, laid out as described in the module docstring."""

    def __init__(self, data_cfg, micro_batch_size, accumulation, rank, world_size, seed, start_step):
        self.augment = MultiCrop.from_config(data_cfg)
        self.image_size = int(data_cfg.synthetic_image_size)
        self.num_classes = int(data_cfg.synthetic_num_classes)
        self.num_images = max(1, int(data_cfg.samples_per_epoch))
        self.micro_batch_size, self.accumulation = micro_batch_size, accumulation
        self.global_batch_size = micro_batch_size * accumulation * world_size
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step

    def first_index(self, micro_batch: int) -> int:
        """Global index of the first sample of this rank's `micro_batch`-th micro-batch."""
        step = self.start_step + micro_batch // self.accumulation
        within_step = micro_batch % self.accumulation
        per_rank = self.global_batch_size // self.world_size
        return step * self.global_batch_size + self.rank * per_rank + within_step * self.micro_batch_size

    def sample(self, index: int) -> tuple[list[np.ndarray], int]:
        # An "epoch" revisits the same images (index mod samples_per_epoch) with fresh crops.
        image, label = synthetic_image(self.seed, index % self.num_images, self.image_size,
                                       self.num_classes)
        return self.augment(image, mixed_rng(self.seed, index, _AUGMENT)), label

    def batch(self, micro_batch: int) -> dict:
        first = self.first_index(micro_batch)
        indices = range(first, first + self.micro_batch_size)
        crops, labels = zip(*(self.sample(i) for i in indices))
        return {"crops": stack_crops(list(crops)),
                "index": torch.tensor(list(indices), dtype=torch.long),
                "label": torch.tensor(labels, dtype=torch.long),
                "skipped": 0}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # The DataLoader takes batches from workers round-robin, so worker w serves w, w+W, ...
        micro_batch = worker
        while True:
            yield self.batch(micro_batch)
            micro_batch += workers
