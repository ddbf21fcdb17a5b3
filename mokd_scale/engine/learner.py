"""One network of the cohort: its student inside a DeepSpeed engine, its fp32 EMA teacher, its centres,
and the verbs the step calls on it (train/step.py).

The teacher lives outside the engine on purpose: DeepSpeed would cast it to bf16, and a bf16 EMA loses
the (1 - m)·Δ increment when m is close to 1 (docs/design.md, invariant 4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import deepspeed
import torch
from torch import nn

from mokd_scale.config import Config, NetworkConfig, search_head_schedule_owner
from mokd_scale.engine.deepspeed_config import deepspeed_config, resolve_precision, zero_stage_of
from mokd_scale.engine.ema import TeacherEMA
from mokd_scale.engine.gradients import GradientGate
from mokd_scale.engine.optim import LAST_LAYER, apply_schedule, build_optimizer, parameter_groups
from mokd_scale.engine.reshard import load_resharded
from mokd_scale.engine.term_gradients import backbone_gradient_norms, replayable
from mokd_scale.method.centers import Centers
from mokd_scale.method.forward import StudentOutputs, TeacherOutputs, student_forward, teacher_forward
from mokd_scale.method.objective import uses_search_heads
from mokd_scale.method.terms import Side
from mokd_scale.models import MokdNetwork, build_network
from mokd_scale.models.compile import compile_regions
from mokd_scale.models.weights import InitialWeights, load_initial_weights
from mokd_scale.runtime.profiling import phase


class Learner:
    """Network `name` of the recipe: engine(student), fp32 teacher, centres."""

    def __init__(self, name: str, config: Config, search_dim: int, device: torch.device, world_size: int,
                 initial: InitialWeights | None = None):
        """initial: the weights student and teacher start from (networks.X.init, read by
        train/init_weights.py); None: random."""
        self.name = name
        self.net_cfg: NetworkConfig = config.networks[name]
        self.dtype = resolve_precision(self.net_cfg.precision, device)
        self.device = device
        self.search_head_owner = search_head_schedule_owner(config, name)
        student, self.teacher = build_student_and_teacher(config, name, search_dim, device, world_size, self.dtype,
                                                          initial)
        self.ds_config = deepspeed_config(self.net_cfg, config, world_size, self.dtype)
        groups = parameter_groups(student, self.net_cfg.search_head_schedule)
        # Before DeepSpeed swaps each group's parameters for its flat fp32 partition, in the same dicts.
        group_params = [list(group["params"]) for group in groups]
        optimizer = build_optimizer(self.net_cfg, groups)
        self.engine, _, _, _ = deepspeed.initialize(model=student.to(device), optimizer=optimizer,
                                                    config=self.ds_config)
        if self.dtype == torch.bfloat16:
            match_buffers_to_parameters(self.engine.module)
        self.zero_stage = self.engine.zero_optimization_stage()
        self.backbone_params = [p for p in self.engine.module.backbone.parameters() if p.requires_grad]
        self.gradients = GradientGate(optimizer, group_params, self.net_cfg.clip_grad,
                                      self.net_cfg.clip_mode == "per_tensor", LAST_LAYER, self.engine.optimizer,
                                      watched=self.backbone_params)
        self.ema = TeacherEMA(self.teacher, self.engine.module, self.zero_stage)
        self.centers = Centers(config.mokd.out_dim, config.mokd.center_momentum,
                               with_search=uses_search_heads(config)).to(device)

    @property
    def student(self) -> nn.Module:
        return self.engine.module

    # --- the step's verbs (train/step.py) ---------------------------------------------------------------
    def begin_step(self, values, measuring: bool = False) -> None:
        """This step's lr / wd into the engine's groups; the gradient gate learns whether the last layer is frozen
        and, on a measuring step (train.term_gradients_every), to count the backbone tensors it clips."""
        apply_schedule(self.engine.optimizer.param_groups, values, self.name, self.search_head_owner)
        self.gradients.begin_step(freeze_last_layer=values.last_layer_frozen, count_clipped=measuring)

    def teacher_side(self, global_crops: list[torch.Tensor]) -> Side:
        """The teacher's targets on the global crops, with the teacher and centres the partners' terms read."""
        self.teacher.train()  # batch statistics in BatchNorm, like the student sees
        with phase("teacher_forward"):
            targets = teacher_forward(self.teacher, global_crops, compute_dtype=self.dtype)
        return Side(targets, self.teacher, self.centers)

    def student_outputs(self, crops: list[torch.Tensor]) -> StudentOutputs:
        with phase("student_forward"):
            return student_forward(self.engine, crops, self.dtype)

    def term_gradient_norms(self, crops: list[torch.Tensor],
                            contributions_of: Callable[[StudentOutputs], dict[str, torch.Tensor]]) -> dict[str, float]:
        """Each weighted term's gradient norm at the student's backbone on these crops, from a replayed forward
        of the plain module before the real one (engine/term_gradients.py); collective, the same on every rank."""
        with replayable(self.student), phase("term_gradients"):
            outputs = student_forward(self.student, crops, self.dtype)
            return backbone_gradient_norms(contributions_of(outputs), self.backbone_params)

    def backward(self, loss: torch.Tensor) -> None:
        with phase("student_backward"):
            self.engine.backward(loss)

    def step(self) -> None:
        """engine.step() after a micro-batch's backward; at the accumulation boundary it updates.
        DeepSpeed may itself skip an update on an overflow (fp32 ZeRO): that counts as non-finite."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        with phase("optimizer"):
            self.engine.step()
        if boundary and not self.gradients.ran:
            self.gradients.non_finite = True

    def accumulate_centers(self, targets: TeacherOutputs) -> None:
        with phase("centers"):
            self.centers.accumulate(targets.proj, targets.search)

    @torch.no_grad()
    def end_step(self, teacher_momentum: float) -> None:
        """After the update: the centres' global-batch update (a collective), then the teacher's EMA
        θ_t ← m·θ_t + (1 − m)·θ_s over all student parameters, in fp32."""
        with phase("centers"):
            self.centers.update()
        with phase("ema"):
            self.ema.update(teacher_momentum)

    # --- the engine's files (train/state.py registers them) ---------------------------------------------
    def save_engine(self, tag_dir: Path) -> None:
        """Collective: the student and its optimizer state under tag_dir/<name>/ (DeepSpeed's layout)."""
        self.engine.save_checkpoint(str(tag_dir), tag=self.name, save_latest=False)

    def load_engine(self, tag_dir: Path, optimizer_states: bool = True) -> None:
        """The engine's own load from tag_dir/<name>/; optimizer_states=False: the module's weights and the
        engine's counters only (load_resharded adds the rest)."""
        path, _ = self.engine.load_checkpoint(str(tag_dir), tag=self.name, load_optimizer_states=optimizer_states,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"checkpoint {tag_dir} has no engine state for network {self.name}")

    def load_resharded(self, tag_dir: Path, whole_weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        """ZeRO state saved by another number of ranks: the module's weights (ZeRO-1/2: the engine's own load,
        with its counters; ZeRO-3, whose per-rank files do not fit another world size: `whole_weights()`), then
        this rank's new partitions of the fp32 weights and of every optimizer state key (engine/reshard.py)."""
        if self.zero_stage == 3:
            self.load_student_weights(whole_weights())
        else:
            self.load_engine(tag_dir, optimizer_states=False)
        load_resharded(self.engine.optimizer, Path(tag_dir) / self.name)

    def load_student_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """fp32 student weights into the engine's module and its fp32 master copy (optimizer state untouched)."""
        if self.zero_stage == 3:  # each rank holds a shard: load whole tensors on rank 0, DeepSpeed re-shards
            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    self.engine.module.load_state_dict(weights)
        else:
            self.engine.module.load_state_dict(weights)
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None and self.zero_stage > 0:
            refresh()


def build_student_and_teacher(config: Config, name: str, search_dim: int, device: torch.device, world_size: int,
                              dtype: torch.dtype, initial: InitialWeights | None = None) -> tuple[nn.Module, nn.Module]:
    """A student (on the CPU, for DeepSpeed to place) and its teacher on `device`: SyncBatchNorm on GPUs
    with several ranks, channels_last for CNNs in bf16 on GPUs, regional compile. The student is randomly
    initialised, then loaded from `initial` when given (the random draws stay those of a run without it,
    so the heads init_heads leaves alone are the same), and the teacher copies it."""
    net = config.networks[name]
    student = build_network(config, name, search_dim=search_dim)
    if initial is not None:
        load_initial_weights(student, initial)
    teacher = make_teacher(config, name, student, search_dim)
    if device.type == "cuda" and world_size > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    teacher = teacher.to(device)
    for network in (student, teacher):
        network.backbone.channels_last = wants_channels_last(network, device, dtype)
    if config.train.compile:
        compile_student_and_teacher(student, teacher, net)
    return student, teacher


def make_teacher(config: Config, name: str, student: nn.Module, search_dim: int) -> nn.Module:
    """The student's weights at step 0 (DINO), fp32, never touched by an optimizer, and built
    without stochastic depth: a teacher's targets and centres must not be random."""
    with torch.device("meta"):  # no random init to throw away: the weights come from the student
        teacher = build_network(config, name, teacher=True, search_dim=search_dim)
    teacher = teacher.to_empty(device=next(student.parameters()).device)
    teacher.load_state_dict(student.state_dict())
    for buffer_name, buffer in student.named_buffers():  # non-persistent buffers are not in a state_dict
        teacher.get_buffer(buffer_name).copy_(buffer)
    teacher.float().requires_grad_(False)
    return teacher


def match_buffers_to_parameters(module: nn.Module) -> None:
    """DeepSpeed casts parameters, not buffers, to bf16. CPU BatchNorm rejects fp32 running stats with
    bf16 input; so does CUDA's BatchNorm when it is recomputed under gradient checkpointing in backward
    ("Expected running_mean to have type BFloat16 but got Float", ResNet-152 of vitl16_r152 on an H100)."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(torch.bfloat16)


def compile_student_and_teacher(student: nn.Module, teacher: nn.Module, net: NetworkConfig) -> None:
    """train.compile: regional torch.compile, before DeepSpeed wraps the student (its engine then
    calls the compiled blocks)."""
    if zero_stage_of(net) == 3:
        raise ValueError(f"train.compile with ZeRO-3 ({net.deepspeed}): ZeRO-3 gathers each block's parameters in "
                         "hooks that a compiled block would have to trace; use a ZeRO-2 config or train.compile=false")
    for network in (student, teacher):
        compile_regions(network)


def wants_channels_last(network: MokdNetwork, device: torch.device, dtype: torch.dtype) -> bool:
    """CNNs in bf16 on a GPU: tensor-core convolutions want NHWC. A CPU or fp32 gains nothing."""
    return not network.backbone.is_vit and device.type == "cuda" and dtype == torch.bfloat16
