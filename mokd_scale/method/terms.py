"""The loss terms, one named function each, and their registry (TERMS).

A term reads one network X's student outputs against one side's targets: its own (a self term) or,
for a partner term, one partner Y's (called once per partner and averaged). For network X:

  self_proj     X student proj,   all crops   vs X teacher proj,   2 globals, centre c_X proj
  self_search   X student search, all crops   vs X teacher search, 2 globals, centre c_X search (no query)
  cross_proj    X student proj,   all crops   vs Y teacher proj,   2 globals, centre c_Y proj
  cross_search  X student search, local crops vs Y teacher search on Y's global-1 tokens with
                query = detached X-student summary of that local crop; no centre
  koleo         DINOv2's KoLeo on X student's L2-normalised pooled features, per global crop, over the
                micro-batch (the one term that depends on the micro-batch size)

Pairing. The DINO terms average over every (teacher global view i, student view v) with v != i:
v == i is the same crop seen by both sides (both networks get identical crops). cross_search pairs
local crop v only with the target built from its own query v; global crop 2 never enters it.

The objective (objective.py) weighs them: L_X = sum of w_t * self term t + lambda_X * sum of
w_t * (partner term t averaged over X's partners), the weights w_t from `mokd.term_weights` over each
term's default. Adding a term: write its function below and add one entry to TERMS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from mokd_scale.method.centers import Centers
from mokd_scale.method.forward import StudentOutputs, TeacherOutputs, cross_search_targets
from mokd_scale.method.losses import dino_cross_entropy, koleo, paired_cross_entropy
from mokd_scale.runtime.profiling import phase


class Side(NamedTuple):
    """What one network offers the others' terms: its teacher's targets, its teacher, its centres."""
    targets: TeacherOutputs
    teacher: nn.Module
    centers: Centers


class TermInputs(NamedTuple):
    student: StudentOutputs  # network X's student on this micro-batch
    own: Side  # X's own teacher side
    partner: Side | None  # the partner of a partner term; None for a self term
    teacher_temperature: float  # X's, at this step
    student_temperature: float
    compute_dtype: torch.dtype | None


def self_proj(x: TermInputs) -> torch.Tensor:
    return dino_cross_entropy(x.student.proj, x.own.targets.proj, x.teacher_temperature, x.student_temperature,
                              center=x.own.centers.proj)


def self_search(x: TermInputs) -> torch.Tensor:
    return dino_cross_entropy(x.student.search, x.own.targets.search, x.teacher_temperature, x.student_temperature,
                              center=x.own.centers.search)


def cross_proj(x: TermInputs) -> torch.Tensor:
    return dino_cross_entropy(x.student.proj, x.partner.targets.proj, x.teacher_temperature, x.student_temperature,
                              center=x.partner.centers.proj)


def cross_search(x: TermInputs) -> torch.Tensor:
    with phase("cross_search_targets"):
        targets = cross_search_targets(x.partner.teacher, x.partner.targets, x.student.local_queries, x.compute_dtype)
    num_global = x.own.targets.proj.shape[0]
    return paired_cross_entropy(x.student.search[num_global:], targets, x.teacher_temperature, x.student_temperature)


def koleo_of_globals(x: TermInputs) -> torch.Tensor:
    """Summed over the two global crops, each over the micro-batch (DINOv2 never pairs the two crops
    of one image)."""
    return sum(koleo(crop) for crop in x.student.global_pooled.chunk(2))


@dataclass(frozen=True)
class Term:
    compute: Callable[[TermInputs], torch.Tensor]
    per_partner: bool  # a cross term: once per partner, averaged, weighted by the network's lambda
    uses_search_head: bool  # needs the search heads (which exist only where such a term is on)
    default_weight: float
    abbreviation: str  # on the console line
    help: str  # README's metrics table and `--print-config`


# Registry order is the order of computation, of metrics.jsonl keys and of the console line.
TERMS: dict[str, Term] = {
    "self_proj": Term(self_proj, False, False, 1.0, "sp", "self-distillation of the projection head (DINO)"),
    "self_search": Term(self_search, False, True, 1.0, "ss", "self-distillation of the search head"),
    "cross_proj": Term(cross_proj, True, False, 1.0, "cp", "projection head against each partner's teacher"),
    "cross_search": Term(cross_search, True, True, 1.0, "cs",
                         "search head on local crops against each partner's teacher queried by them"),
    "koleo": Term(koleo_of_globals, False, False, 0.0, "ko",
                  "DINOv2's KoLeo on the pooled features of each global crop, over the micro-batch"),
}


def terms_table() -> str:
    """The README's table of loss terms, from the registry (tests/test_readme.py keeps the README equal)."""
    rows = ["| term (metrics.jsonl key `X.term`, TensorBoard `train/X/term`) | what | per partner | default weight |",
            "| --- | --- | --- | --- |"]
    rows += [f"| `{name}` | {term.help} | {'yes, averaged, × λ_X' if term.per_partner else 'no'} | "
             f"{term.default_weight:g} |" for name, term in TERMS.items()]
    return "\n".join(rows)
