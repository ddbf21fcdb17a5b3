"""The recipe's fields: one frozen dataclass per section, each field with its type, default and a
one-line help (`mokd-train --print-config` shows them beside the values).

A field with a fixed set of values is typed `Literal[...]`: that declaration is the only list of
allowed values, and config.convert() checks every such field with it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def setting(default, help: str):
    """A field with its help text (a dict default gets a fresh copy per instance)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    if isinstance(default, type) or callable(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def help_of(dataclass_field) -> str:
    return dataclass_field.metadata.get("help", "")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["shards", "synthetic"] = setting(
        "shards", "shards: WebDataset tars; synthetic: generated images (tests, benchmarks)")
    train_shards: str = setting("", "index JSON from mokd-shards, or a brace pattern of .tar files")
    val_shards: str = setting("", "labelled shards for the k-NN evaluation")
    knn_train_shards: str = setting("", "labelled shards for the k-NN memory bank; empty: train_shards")
    samples_per_epoch: int = setting(1281167, "samples in one epoch over all ranks (sets steps per epoch)")
    workers: int = setting(8, "DataLoader worker processes per rank")
    shuffle_buffer: int = setting(5000, "encoded samples each worker shuffles among (~110 KB each for ImageNet)")
    global_crop_size: int = setting(224, "pixels of the 2 global crops")
    local_crop_size: int = setting(96, "pixels of the local crops")
    num_local_crops: int = setting(8, "local crops per image")
    global_crop_scale: tuple[float, float] = setting((0.4, 1.0), "area fraction range of a global crop")
    local_crop_scale: tuple[float, float] = setting((0.05, 0.4), "area fraction range of a local crop")
    color_jitter_prob: float = setting(0.8, "probability of colour jitter per crop")
    grayscale_prob: float = setting(0.2, "probability of grey scale per crop")
    blur_prob_global: tuple[float, float] = setting((1.0, 0.1), "Gaussian blur probability of global crop 1 and 2")
    blur_prob_local: float = setting(0.5, "Gaussian blur probability of a local crop")
    solarize_prob_global2: float = setting(0.2, "solarisation probability of global crop 2")
    eval_resize: int = setting(256, "evaluation: resize the short side to this")
    eval_crop: int = setting(224, "evaluation: centre crop of this size")
    synthetic_image_size: int = setting(256, "pixels of a synthetic image")
    synthetic_num_classes: int = setting(10, "classes of the synthetic source")
    mean: tuple[float, float, float] = setting(IMAGENET_MEAN, "per-channel mean for normalisation")
    std: tuple[float, float, float] = setting(IMAGENET_STD, "per-channel standard deviation for normalisation")


@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int = setting(1024, "images per optimizer step over all ranks")
    micro_batch_size: int = setting(32, "images per rank per forward; the rest is gradient accumulation")
    steps: int = setting(125100, "optimizer steps of the whole run (schedules span them)")
    warmup_epochs: float = setting(10.0, "linear lr warm-up from 0, in epochs")
    freeze_last_layer_epochs: float = setting(1.0, "epochs during which the heads' last layers take no update")
    log_every: int = setting(20, "steps between metric lines")
    checkpoint_every: int = setting(1000, "steps between checkpoints")
    keep_last: int = setting(3, "checkpoints kept")
    stop_after_steps: int = setting(0, "end this run cleanly after N more steps (0: run to `steps`)")
    knn_every: int = setting(0, "steps between k-NN evaluations of both teachers (0: none)")
    # It must exceed the longest healthy wait: a checkpoint save or k-NN pass on a slow rank, the
    # first step's loader warm-up.
    collective_timeout_s: float = setting(600.0, "a collective waiting longer than this ends the run (a hung rank)")
    compile: bool = setting(False, "torch.compile each block and head (for GPUs)")
    term_gradients_every: int = setting(
        0, "every N steps, per network: each loss term's gradient norm at the student's backbone and the fraction "
           "of backbone tensors clipped (metrics X.grad.*; 0: off, at no cost)")


@dataclass(frozen=True)
class NetworkConfig:
    arch: str = setting("vit_small_patch16_224", "timm architecture (a ViT pooled by its class token, or a CNN)")
    arch_kwargs: dict = setting({}, "extra timm.create_model arguments, e.g. {output_stride: 16}")
    lambda_cross: float = setting(1.0, "weight of the cross terms (YAML key: lambda), averaged over the partners; "
                                       "1.0 for the weaker network")
    optimizer: Literal["adamw", "sgd", "lars"] = setting("adamw", "adamw for ViTs, sgd or lars for CNNs")
    lr: float = setting(5e-4, "peak lr per 256 images (scaled by global_batch_size / 256)")
    min_lr: float = setting(1e-6, "lr at the end of the cosine")
    weight_decay: float = setting(0.04, "weight decay at the start (cosine to weight_decay_end)")
    weight_decay_end: float = setting(0.4, "weight decay at the end")
    momentum: float = setting(0.9, "SGD / LARS momentum")
    clip_grad: float = setting(3.0, "gradient clipping threshold (0: none)")
    clip_mode: Literal["per_tensor", "global"] = setting(
        "per_tensor", "per_tensor: each tensor's gradient norm, as the authors; global: one norm (DeepSpeed)")
    warmup_teacher_temperature_epochs: int = setting(
        30, "epochs over which this network's teacher temperature warms up")
    search_head_schedule: str = setting(
        "own", "own; partner: the search head takes the partner's lr and weight decay, as the authors' CNN "
               "(a pair); or the name of the network whose schedules it takes")
    deepspeed: str = setting("ds_configs/zero2_bf16.json", "DeepSpeed JSON (ZeRO stage, buckets)")
    precision: Literal["auto", "bf16", "fp32"] = setting("auto", "auto: bf16 on GPUs that have it, else fp32")
    grad_checkpointing: bool = setting(False, "recompute backbone activations in backward (less memory)")
    drop_path_rate: float = setting(0.1, "stochastic depth of the student (teachers never drop paths)")
    proj_freeze_scale: bool = setting(True, "freeze the projection head's weight-norm scale (DINO's norm_last_layer)")
    proj_batchnorm: bool = setting(False, "BatchNorm in the projection head's hidden layers")
    search_freeze_scale: bool = setting(False, "freeze the search head's weight-norm scale")
    init: str = setting("", "start student and teacher from these weights: a mokd-export folder, a timm "
                            "model.safetensors / .pth of this architecture, or a checkpoint of this package "
                            "(this network's teacher); empty: random; a resumed run ignores it")
    init_heads: bool = setting(False, "with init from a checkpoint: also start the projection and search heads "
                                      "from it (same head shapes)")


class Networks(Mapping):
    """The recipe's networks by the names it gives them, in the recipe's order (the order they are built
    in, step in and log in). A read-only mapping; `networks.a` reads as `networks["a"]`."""

    def __init__(self, networks: dict[str, NetworkConfig]):
        self._networks = dict(networks)

    def __getitem__(self, name: str) -> NetworkConfig:
        return self._networks[name]

    def __iter__(self):
        return iter(self._networks)

    def __len__(self) -> int:
        return len(self._networks)

    def __getattr__(self, name: str) -> NetworkConfig:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._networks[name]
        except KeyError:
            raise AttributeError(f"no network {name!r}: the recipe has {list(self._networks)}") from None

    def __repr__(self) -> str:
        return f"Networks({self._networks!r})"


def default_networks() -> Networks:
    return Networks({"a": NetworkConfig(), "b": NetworkConfig()})


@dataclass(frozen=True)
class MokdConfig:
    mode: Literal["mokd", "independent"] = setting(
        "mokd", "independent: each network alone with DINO (no search heads, no cross or search terms), the baseline")
    out_dim: int = setting(65536, "K, prototypes of every projection and search head")
    proj_hidden_dim: int = setting(2048, "projection head MLP width")
    proj_bottleneck_dim: int = setting(256, "projection head bottleneck before the last layer")
    search_depth: int = setting(3, "transformer blocks of the search head")
    search_dim: int = setting(0, "search head width D shared by every search head (0: the token models' width)")
    search_head_dim: int = setting(64, "channels per attention head of the search head")
    search_l2_normalize: bool = setting(False, "L2-normalise the pooled search feature before its last layer")
    term_weights: dict = setting({}, "loss-term weights over the registry's defaults (mokd_scale/method/terms.py), "
                                     "e.g. {koleo: 0.1}; a term with weight 0 is not computed")
    student_temperature: float = setting(0.1, "student softmax temperature")
    teacher_temperature: float = setting(0.07, "teacher temperature after the warm-up")
    warmup_teacher_temperature: float = setting(0.04, "teacher temperature at the start of the warm-up")
    center_momentum: float = setting(0.9, "EMA momentum of the centres")
    teacher_momentum: float = setting(0.996, "EMA momentum of the teachers at step 0 (cosine to the end value)")
    teacher_momentum_end: float = setting(1.0, "EMA momentum of the teachers at the end")


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = setting(20, "neighbours of the weighted k-NN")
    knn_temperature: float = setting(0.07, "temperature of the k-NN weights")
    batch_size: int = setting(128, "images per rank per evaluation forward")
    max_train_samples: int = setting(0, "memory bank size cap (0: all)")
    max_val_samples: int = setting(0, "query count cap (0: all)")


@dataclass(frozen=True)
class Config:
    output_dir: str = setting("runs/mokd", "the run's folder: config, metrics, TensorBoard, checkpoints")
    seed: int = setting(0, "initial weights and data order")
    data: DataConfig = setting(DataConfig, "images, shards and augmentation")
    train: TrainConfig = setting(TrainConfig, "batch, steps, schedule lengths, logging, checkpoints")
    networks: Networks = setting(default_networks, "the networks by name (one: DINO; two: MOKD; more: a cohort), "
                                                   "each with its optimizer and engine")
    mokd: MokdConfig = setting(MokdConfig, "the method: heads, temperatures, centres, teachers")
    eval: EvalConfig = setting(EvalConfig, "k-NN evaluation")
