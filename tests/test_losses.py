"""Loss terms against float64 references written from the formulas, view pairing,
gradient isolation, centres, the teacher-temperature schedule and the bf16 path."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from mokd_scale.config import load_config
from mokd_scale.method.centers import Centers
from mokd_scale.method.forward import student_forward, teacher_forward
from mokd_scale.method.losses import dino_cross_entropy, paired_cross_entropy
from mokd_scale.method.objective import Objective
from mokd_scale.method.terms import Side
from mokd_scale.models import build_network

TEACHER_T, STUDENT_T = 0.04, 0.1
TINY_VIT = "{patch_size: 4, img_size: 32, embed_dim: 64, depth: %d, num_heads: 2}"


# ---------------------------------------------------------------- float64 references

def ref_softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    shifted = z - z.max()
    return shifted - torch.log(torch.exp(shifted).sum())


def ref_ce(target: torch.Tensor, student: torch.Tensor, center=None) -> float:
    """-sum_k p(k) log q(k) for one sample, float64."""
    target = target.double() - (0 if center is None else center.double().reshape(-1))
    p = ref_softmax(target / TEACHER_T)
    log_q = ref_log_softmax(student.double() / STUDENT_T)
    return float(-(p * log_q).sum())


def ref_dino(student_views, teacher_views, center=None) -> float:
    total, pairs = 0.0, 0
    for i in range(len(teacher_views)):
        for v in range(len(student_views)):
            if v == i:
                continue
            batch = teacher_views[i].shape[0]
            total += sum(ref_ce(teacher_views[i][b], student_views[v][b], center) for b in range(batch)) / batch
            pairs += 1
    return total / pairs


def ref_paired(student_views, targets) -> float:
    total = 0.0
    for student, target in zip(student_views, targets):
        total += sum(ref_ce(target[b], student[b]) for b in range(student.shape[0])) / student.shape[0]
    return total / len(targets)


def assert_relative(value, expected, rtol):
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert abs(value - expected) <= rtol * abs(expected), (value, expected)


# ---------------------------------------------------------------- loss functions

@pytest.mark.parametrize("num_student,batch,out_dim", [(10, 2, 65536), (4, 5, 17), (3, 1, 1000)])
def test_dino_cross_entropy_matches_float64_reference(num_student, batch, out_dim):
    gen = torch.Generator().manual_seed(num_student)
    # Head outputs are scaled cosines: in [-1, 1] (the weight-norm scale starts at 1).
    student = [torch.tanh(2 * torch.randn(batch, out_dim, generator=gen)) for _ in range(num_student)]
    teacher = [torch.tanh(torch.randn(batch, out_dim, generator=gen)) for _ in range(2)]
    center = torch.randn(1, out_dim, generator=gen) * 0.1
    loss = dino_cross_entropy(student, teacher, TEACHER_T, STUDENT_T, center=center)
    assert loss.dtype == torch.float32
    assert_relative(loss, ref_dino(student, teacher, center), 1e-6)
    assert_relative(dino_cross_entropy(student, teacher, TEACHER_T, STUDENT_T), ref_dino(student, teacher), 1e-6)


def test_paired_cross_entropy_matches_float64_reference():
    gen = torch.Generator().manual_seed(1)
    student = [torch.tanh(2 * torch.randn(3, 65536, generator=gen)) for _ in range(8)]
    targets = [torch.tanh(torch.randn(3, 65536, generator=gen)) for _ in range(8)]
    loss = paired_cross_entropy(student, targets, TEACHER_T, STUDENT_T)
    assert_relative(loss, ref_paired(student, targets), 1e-6)


def test_dino_pairs_skip_the_same_crop():
    gen = torch.Generator().manual_seed(2)
    teacher = [torch.randn(2, 50, generator=gen)]
    student = [torch.randn(2, 50, generator=gen) for _ in range(3)]
    loss = dino_cross_entropy(student, teacher, TEACHER_T, STUDENT_T)
    student[0] = student[0] + 5 * torch.randn(2, 50, generator=gen)  # only pair (0, 0) sees it
    torch.testing.assert_close(dino_cross_entropy(student, teacher, TEACHER_T, STUDENT_T), loss)
    student[1] = student[1] + 5 * torch.randn(2, 50, generator=gen)
    assert (dino_cross_entropy(student, teacher, TEACHER_T, STUDENT_T) - loss).abs() > 1e-3


def test_bf16_logits_are_softmaxed_in_fp32():
    gen = torch.Generator().manual_seed(3)
    student = [torch.randn(2, 4096, generator=gen).bfloat16() for _ in range(4)]
    teacher = [torch.randn(2, 4096, generator=gen).bfloat16() for _ in range(2)]
    loss = dino_cross_entropy(student, teacher, TEACHER_T, STUDENT_T)
    assert loss.dtype == torch.float32
    assert_relative(loss, ref_dino(student, teacher), 1e-6)


# ---------------------------------------------------------------- centres and schedule

def test_centers_accumulate_micro_batches_then_update_once():
    gen = torch.Generator().manual_seed(4)
    centers = Centers(out_dim=6, momentum=0.9)
    start = torch.randn(1, 6, generator=gen)
    centers.proj.copy_(start)
    micro = [([torch.randn(3, 6, generator=gen) for _ in range(2)], [torch.randn(3, 6, generator=gen) for _ in range(2)])
             for _ in range(2)]
    for proj, search in micro:
        centers.accumulate(proj, search)
    centers.update()
    all_proj = torch.cat([view for proj, _ in micro for view in proj])
    all_search = torch.cat([view for _, search in micro for view in search])
    torch.testing.assert_close(centers.proj, 0.9 * start + 0.1 * all_proj.mean(0, keepdim=True))
    torch.testing.assert_close(centers.search, 0.1 * all_search.mean(0, keepdim=True))
    assert set(centers.state_dict()) == {"proj", "search"}
    with pytest.raises(RuntimeError, match="without accumulate"):
        centers.update()  # the sums were reset


# ---------------------------------------------------------------- network-level terms

def tiny_config(cnn_student: bool = False, out_dim: int = 256, term_weights: str = "{}"):
    """Two tiny ViTs of different depth (LayerNorm only), or a slim ResNet-18 as network a."""
    a_arch = ["networks.a.arch=resnet18", "networks.a.arch_kwargs={channels: [8, 16, 32, 64]}"] if cnn_student \
        else ["networks.a.arch=vit_tiny_patch16_224", f"networks.a.arch_kwargs={TINY_VIT % 2}"]
    return load_config("tiny_cpu", [
        *a_arch, "networks.b.arch=vit_tiny_patch16_224", f"networks.b.arch_kwargs={TINY_VIT % 1}",
        "networks.a.proj_batchnorm=false", "networks.b.proj_batchnorm=false",
        f"mokd.out_dim={out_dim}", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16",
        "mokd.search_depth=2", "mokd.search_dim=0", "mokd.search_head_dim=32", f"mokd.term_weights={term_weights}"])


def perturbed_copy(module, gen, scale=0.02):
    teacher = copy.deepcopy(module)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return teacher


def build_pair(cfg, seed=0):
    """Students, teachers (perturbed copies so they differ) and random centres, for a and b."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    students = {n: build_network(cfg, n) for n in ("a", "b")}
    teachers = {n: perturbed_copy(s, gen) for n, s in students.items()}
    centers = {}
    for name in ("a", "b"):
        centers[name] = Centers(cfg.mokd.out_dim, cfg.mokd.center_momentum)
        centers[name].proj.copy_(0.1 * torch.randn(1, cfg.mokd.out_dim, generator=gen))
        centers[name].search.copy_(0.1 * torch.randn(1, cfg.mokd.out_dim, generator=gen))
    return students, teachers, centers


def make_crops(batch, num_local, seed=0, global_size=32, local_size=16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, global_size, global_size, generator=gen) for _ in range(2)] + \
        [torch.randn(batch, 3, local_size, local_size, generator=gen) for _ in range(num_local)]


def network_terms(cfg, x, student, crops, sides, lambda_cross, compute_dtype=None) -> dict:
    """Network x's terms and total through the objective, as the step computes them: {term: value, "total"}."""
    objective = Objective(cfg)
    objective.lambdas[x] = lambda_cross
    terms = objective(x, student_forward(student, crops, compute_dtype), sides, TEACHER_T, compute_dtype)
    return {**terms.values, "total": terms.total}


def sides_of(teachers, centers, crops, compute_dtype=None, **targets) -> dict:
    return {n: Side(targets.get(n) or teacher_forward(teachers[n], crops[:2], compute_dtype), teachers[n], centers[n])
            for n in teachers}


def losses_for(x, y, students, teachers, centers, crops, lambda_cross=0.5, compute_dtype=None, cfg=None):
    sides = sides_of(teachers, centers, crops, compute_dtype)
    return network_terms(cfg or tiny_config(), x, students[x], crops, sides, lambda_cross, compute_dtype)


def reference_terms(x, y, students, teachers, centers, crops):
    """Each crop through float64 copies of the networks one at a time, then the formulas."""
    student, own_t, partner_t = (copy.deepcopy(m).double() for m in (students[x], teachers[x], teachers[y]))
    with torch.no_grad():
        s_out = [student(crop.double()) for crop in crops]
        own = [own_t(crop.double()) for crop in crops[:2]]
        partner = [partner_t(crop.double()) for crop in crops[:2]]
        targets = [partner_t.search_head(partner[0].search_tokens, query=out.summary) for out in s_out[2:]]
    proj, search = [o.proj for o in s_out], [o.search for o in s_out]
    return {
        "self_proj": ref_dino(proj, [o.proj for o in own], centers[x].proj),
        "self_search": ref_dino(search, [o.search for o in own], centers[x].search),
        "cross_proj": ref_dino(proj, [o.proj for o in partner], centers[y].proj),
        "cross_search": ref_paired(search[2:], targets),
    }


@pytest.mark.parametrize("cnn_student", [False, True])
def test_network_terms_match_float64_reference(cnn_student):
    cfg = tiny_config(cnn_student)
    students, teachers, centers = build_pair(cfg)
    for module in (*students.values(), *teachers.values()):
        module.eval()  # BatchNorm (ResNet) must not depend on how crops are batched
    crops = make_crops(batch=3 if cnn_student else 2, num_local=2 if cnn_student else 4)
    terms = losses_for("a", "b", students, teachers, centers, crops, lambda_cross=0.5, cfg=cfg)
    expected = reference_terms("a", "b", students, teachers, centers, crops)
    for name, value in expected.items():
        assert_relative(terms[name], value, 1e-5)
    cross = expected["cross_proj"] + expected["cross_search"]
    assert_relative(terms["total"], expected["self_proj"] + expected["self_search"] + 0.5 * cross, 1e-5)


@pytest.fixture(scope="module")
def vit_pair():
    return build_pair(tiny_config())


def replaced(crops, index, seed=9):
    changed = list(crops)
    changed[index] = torch.randn(crops[index].shape, generator=torch.Generator().manual_seed(seed))
    return changed


def test_cross_search_uses_local_crops_and_partner_global1_only(vit_pair):
    students, teachers, centers = vit_pair
    crops = make_crops(batch=2, num_local=2)
    base_own = teacher_forward(teachers["a"], crops[:2])
    base_partner = teacher_forward(teachers["b"], crops[:2])

    def terms(student_crops, partner_crops):
        sides = sides_of(teachers, centers, partner_crops, a=base_own)
        return network_terms(tiny_config(), "a", students["a"], student_crops, sides, 1.0)

    base = terms(crops, crops)
    # Partner teacher's global 2 changes: its projection target moves, the cross-search target not.
    other = terms(crops, replaced(crops, 1))
    torch.testing.assert_close(other["cross_search"], base["cross_search"], rtol=0, atol=1e-6)
    assert abs(other["cross_proj"] - base["cross_proj"]) > 1e-4
    # A student global crop changes: every term but cross-search moves.
    other = terms(replaced(crops, 0), crops)
    torch.testing.assert_close(other["cross_search"], base["cross_search"], rtol=0, atol=1e-6)
    assert abs(other["self_proj"] - base["self_proj"]) > 1e-4
    # Partner global 1 or a student local crop: cross-search moves.
    assert abs(terms(crops, replaced(crops, 0))["cross_search"] - base["cross_search"]) > 1e-4
    assert abs(terms(replaced(crops, 3), crops)["cross_search"] - base["cross_search"]) > 1e-4
    assert base_partner.global1_search_tokens.shape == (2, 64, 64)


def test_gradients_reach_own_student_only(vit_pair):
    students, teachers, centers = (copy.deepcopy(part) for part in vit_pair)
    for module in (students["b"], *teachers.values()):
        module.requires_grad_(True)  # would collect gradients if anything leaked
    terms = losses_for("a", "b", students, teachers, centers, make_crops(batch=2, num_local=2))
    terms["total"].backward()
    for name, module in (("partner student", students["b"]), ("own teacher", teachers["a"]),
                         ("partner teacher", teachers["b"])):
        leaked = [n for n, p in module.named_parameters() if p.grad is not None]
        assert not leaked, f"{name} got gradients: {leaked[:3]}"
    missing = [n for n, p in students["a"].named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"student parameters without gradient: {missing}"


def test_bf16_student_matches_fp32_within_bf16_tolerance():
    students, teachers, centers = build_pair(tiny_config(out_dim=128))
    crops = make_crops(batch=2, num_local=1, global_size=16, local_size=8)
    fp32 = losses_for("a", "b", students, teachers, centers, crops)
    students["a"] = students["a"].to(torch.bfloat16)  # what DeepSpeed's bf16 mode does
    bf16 = losses_for("a", "b", students, teachers, centers, crops, compute_dtype=torch.bfloat16)
    for name, value in bf16.items():
        assert value.dtype == torch.float32 and math.isfinite(float(value.detach()))
        assert_relative(value, float(fp32[name].detach()), 0.05)
    bf16["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in students["a"].parameters() if p.grad is not None)


def test_cross_search_targets_in_one_forward_equal_one_forward_per_local_crop(vit_pair):
    from mokd_scale.method.forward import cross_search_targets
    _, teachers, _ = vit_pair
    crops = make_crops(batch=3, num_local=4)
    partner = teacher_forward(teachers["b"], crops[:2])
    queries = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(5))
    batched = cross_search_targets(teachers["b"], partner, queries)
    with torch.no_grad():
        one_by_one = torch.stack([teachers["b"].search_head(partner.global1_search_tokens, query=q) for q in queries])
    assert batched.shape == (4, 3, 256)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- KoLeo (DINOv2's regulariser)

def ref_koleo(features: torch.Tensor, eps: float = 1e-8) -> float:
    """float64, sample by sample: -mean_i log(||x_i - x_nn(i) + eps|| + eps) over L2-normalised rows,
    nn(i) the other row of largest inner product."""
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    total = 0.0
    for i in range(x.shape[0]):
        others = [j for j in range(x.shape[0]) if j != i]
        nearest = max(others, key=lambda j: float(x[i] @ x[j]))
        total += -math.log(float((x[i] - x[nearest] + eps).norm()) + eps)
    return total / x.shape[0]


def test_koleo_matches_float64_reference_and_pushes_neighbours_apart():
    from mokd_scale.method.losses import koleo
    gen = torch.Generator().manual_seed(6)
    features = torch.randn(7, 12, generator=gen, requires_grad=True)
    loss = koleo(features)
    assert loss.dtype == torch.float32
    assert_relative(loss, ref_koleo(features.detach()), 1e-6)
    loss.backward()
    with torch.no_grad():  # a small step against the gradient spreads the batch: the loss falls
        assert koleo(features - 1e-2 * features.grad) < loss
    clustered = torch.randn(1, 12, generator=gen).repeat(6, 1) + 1e-3 * torch.randn(6, 12, generator=gen)
    assert koleo(clustered) > koleo(torch.randn(6, 12, generator=gen))  # near-duplicates cost more
    with pytest.raises(ValueError, match="at least 2"):
        koleo(torch.randn(1, 12))


def test_koleo_term_sums_the_two_global_crops_over_the_micro_batch(vit_pair):
    from mokd_scale.method.losses import koleo
    students, teachers, centers = vit_pair
    crops = make_crops(batch=4, num_local=2)
    config = tiny_config(term_weights="{koleo: 0.5}")
    terms = network_terms(config, "a", students["a"], crops, sides_of(teachers, centers, crops), 0.5)
    pooled = torch.cat([students["a"].backbone(crop).pooled for crop in crops[:2]])
    expected = koleo(pooled[:4]) + koleo(pooled[4:])  # never across the two crops of one image
    torch.testing.assert_close(terms["koleo"], expected, rtol=1e-5, atol=1e-6)
    without = network_terms(tiny_config(), "a", students["a"], crops, sides_of(teachers, centers, crops), 0.5)
    assert "koleo" not in without  # weight 0: not computed
    torch.testing.assert_close(terms["total"], without["total"] + 0.5 * expected, rtol=1e-5, atol=1e-6)
