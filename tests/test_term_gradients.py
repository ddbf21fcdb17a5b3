"""train.term_gradients_every: each weighted loss term's gradient norm at a student's backbone equals autograd
of that term alone, the terms add up to the update the optimizer makes, measuring leaves the update as it
was, and the gradient gate's clipped fraction is the share of backbone tensors over the clip."""
from __future__ import annotations

import statistics

import pytest
import torch

from mokd_scale.config import ConfigError, load_config
from mokd_scale.train.metrics import tensorboard_tag
from tests.dist_harness import run_on_ranks
from tests.test_gradients import micro_batches, sgd_config, whole_parameters

pytestmark = pytest.mark.integration

LAMBDAS = {"a": 1.0, "b": 0.1}  # tiny_cpu's, which sgd_config keeps
CROSS_TERMS = ("cross_proj", "cross_search")


def backbone_names(learner) -> list[str]:
    return [f"backbone.{name}" for name, p in learner.student.backbone.named_parameters() if p.requires_grad]


def reference_norms(config, batches) -> dict[str, dict[str, float]]:
    """Fresh learners (same seed, same weights, the same random draws): the step's forwards of the plain modules,
    then each term alone through autograd,
    weighted as the paper writes L_X (cross terms times λ_X: b's 0.1 would make them 10 times too large
    if left out)."""
    from mokd_scale.data import normalize_crops
    from mokd_scale.method.forward import student_forward
    from tests.steps import learners_and_step
    learners, step = learners_and_step(config)
    values = step.schedules.at(0)
    crops = normalize_crops(batches[0]["crops"], torch.device("cpu"), torch.float32, config.data.mean, config.data.std)
    sides = {name: learner.teacher_side(crops[:2]) for name, learner in learners.items()}
    norms = {}
    for name, learner in learners.items():
        terms = step.objective(name, student_forward(learner.student, crops), sides,
                               values.networks[name].teacher_temperature, learner.dtype)
        params = learner.backbone_params
        norms[name], total = {}, [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for term, value in terms.values.items():
            weight = LAMBDAS[name] if term in CROSS_TERMS else 1.0
            grads = torch.autograd.grad(weight * value, params, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            norms[name][term] = vector_norm(grads)
            total = [t + g.double() for t, g in zip(total, grads)]
        norms[name]["sum"] = vector_norm(total)
    return norms


def vector_norm(tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def one_step(config, batches):
    """The step as mokd-train runs it: its record, and minus each backbone's update (SGD at lr 1: the gradient)."""
    from tests.steps import learners_and_step
    learners, step = learners_and_step(config)
    before = {n: whole_parameters(learner) for n, learner in learners.items()}
    record = step(0, batches)
    after = {n: whole_parameters(learner) for n, learner in learners.items()}
    updates = {n: {k: before[n][k] - after[n][k] for k in backbone_names(learners[n])} for n in learners}
    return record, updates


# One micro-batch per step (the measured one is the whole batch), and stochastic depth in the ViT: the
# measuring forward must draw the masks the real one then draws.
DROP_PATH = ["train.micro_batch_size=8", "networks.a.drop_path_rate=0.2"]


def measured_against_references(rank, world_size):
    plain = sgd_config(0, 0.0, DROP_PATH)
    measuring = sgd_config(0, 0.0, [*DROP_PATH, "train.term_gradients_every=1"])
    batches = micro_batches(plain, rank, world_size)
    assert len(batches) == 1
    record, updates = one_step(measuring, batches)
    _, plain_updates = one_step(plain, batches)
    references = reference_norms(measuring, batches)
    # The clip at the median backbone tensor norm: about half the tensors are clipped.
    tensor_norms = {n: [float(u.norm()) for u in updates[n].values()] for n in updates}
    clip = statistics.median(tensor_norms["a"])
    clipped_record, _ = one_step(sgd_config(0, clip, [*DROP_PATH, "train.term_gradients_every=1"]), batches)
    return (record.term_gradients, record.clipped_fraction, references, updates, plain_updates, tensor_norms, clip,
            clipped_record.clipped_fraction)


def test_term_gradient_norms_are_autograd_of_each_weighted_term_and_add_up_to_the_update():
    measured, unclipped, references, updates, plain_updates, tensor_norms, clip, clipped = run_on_ranks(
        measured_against_references, 1, timeout=300)
    assert set(measured) == {"a", "b"}
    for name in measured:
        assert set(measured[name]) == {"self_proj", "self_search", "cross_proj", "cross_search"}
        assert any(update.abs().sum() > 0 for update in updates[name].values())
        for term, norm in measured[name].items():
            assert norm == pytest.approx(references[name][term], rel=1e-5), (name, term)
            assert norm > 0
        # The terms add up to the backbone's whole gradient: the update SGD made at lr 1, unclipped.
        assert references[name]["sum"] == pytest.approx(vector_norm(updates[name].values()), rel=1e-4)
        # Measuring changes nothing: the update is the one of a step that does not measure.
        for key, update in updates[name].items():
            assert torch.equal(update, plain_updates[name][key]), key
    # Without clipping nothing is clipped; at the median tensor norm, the tensors above it are.
    assert unclipped == {"a": None, "b": None}  # clip 0: no per-tensor clipping, nothing to count
    for name in ("a", "b"):
        expected = sum(n + 1e-6 > clip for n in tensor_norms[name]) / len(tensor_norms[name])
        assert clipped[name] == pytest.approx(expected)
    assert 0.3 < clipped["a"] < 0.7


def rank_means(rank, world_size):
    from mokd_scale.engine.term_gradients import rank_mean_norm
    grads = [torch.full((3,), float(rank + 1)), torch.full((2, 2), -2.0 * (rank + 1))]
    return rank_mean_norm(grads)


def test_with_several_ranks_the_norm_is_that_of_the_ranks_mean_gradient():
    # Ranks hold 1·g and 2·g: the mean gradient is 1.5·g, not the mean of the norms' squares.
    g_norm = (3 * 1.0 + 4 * 4.0) ** 0.5
    assert run_on_ranks(rank_means, 2, timeout=120) == pytest.approx(1.5 * g_norm)


def test_metrics_keys_group_under_grad_in_tensorboard():
    assert tensorboard_tag("a.grad.self_search", ("a", "b")) == "grad/a/self_search"
    assert tensorboard_tag("b.grad.clipped_fraction", ("a", "b")) == "grad/b/clipped_fraction"
    assert tensorboard_tag("a.grad_norm", ("a", "b")) == "train/a/grad_norm"


def test_zero3_and_negative_values_are_refused_before_any_process_group():
    from mokd_scale.engine.term_gradients import check_term_gradients
    with pytest.raises(ConfigError, match="train.term_gradients_every"):
        load_config("tiny_cpu", ["train.term_gradients_every=-1"])
    config = load_config("tiny_cpu", ["train.term_gradients_every=10", "networks.b.deepspeed=ds_configs/zero3_bf16.json"])
    with pytest.raises(ConfigError, match="networks.b.deepspeed"):
        check_term_gradients(config)
    check_term_gradients(load_config("tiny_cpu", ["train.term_gradients_every=10"]))  # ZeRO-0: fine
