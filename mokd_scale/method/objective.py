"""The objective: which loss terms are on, against whom, and each network's weighted total.

One network alone, or `mokd.mode: independent`: the self terms that need no partner (plain DINO: the
projection term; KoLeo if weighted), no search heads. Two networks: MOKD. More: a cohort, this
package's extension of the paper (docs/fidelity.md): each network's partner terms are averaged over
every other network, so that two networks give the paper's loss exactly.

  L_X = sum_t w_t * term_t(X)  +  lambda_X * sum_t' w_t' * mean over partners Y of term_t'(X, Y)
        (self terms t)                       (partner terms t')
"""
from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import torch

from mokd_scale.method.forward import StudentOutputs
from mokd_scale.method.terms import TERMS, Side, TermInputs
from mokd_scale.runtime.profiling import phase


def has_partners(config) -> bool:
    return config.mokd.mode == "mokd" and len(config.networks) > 1


def partners_of(config, name: str) -> tuple[str, ...]:
    """The networks whose teachers network `name` learns from (none in independent mode)."""
    return tuple(other for other in config.networks if other != name) if has_partners(config) else ()


def term_weights(config) -> dict[str, float]:
    """The terms that are on (weight > 0), in registry order, with their weights."""
    weights = {name: float(config.mokd.term_weights.get(name, term.default_weight)) for name, term in TERMS.items()}
    if not has_partners(config):  # the search head exists to search a partner's tokens
        weights = {name: w for name, w in weights.items()
                   if not TERMS[name].per_partner and not TERMS[name].uses_search_head}
    return {name: w for name, w in weights.items() if w > 0}


def uses_search_heads(config) -> bool:
    return any(TERMS[name].uses_search_head for name in term_weights(config))


class TermValues(NamedTuple):
    values: dict[str, torch.Tensor]  # each active term, fp32 scalar (a partner term: its mean over partners)
    total: torch.Tensor  # the weighted total, with a graph into the network's student only


def add(tensors: list[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(operator.add, tensors)  # no `0 +` in front: one kernel fewer, the same value


def weighted(values: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    return add([value if weight == 1.0 else weight * value for weight, value in values])


class Objective:
    def __init__(self, config):
        self.weights = term_weights(config)
        self.partners = {name: partners_of(config, name) for name in config.networks}
        self.lambdas = {name: net.lambda_cross for name, net in config.networks.items()}
        self.student_temperature = config.mokd.student_temperature

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(self.weights)

    def __call__(self, name: str, student: StudentOutputs, sides: dict[str, Side], teacher_temperature: float,
                 compute_dtype: torch.dtype | None = None) -> TermValues:
        """Network `name`'s terms and total for one micro-batch; `sides`: every network's teacher side."""
        def inputs(partner: Side | None) -> TermInputs:
            return TermInputs(student, sides[name], partner, teacher_temperature, self.student_temperature,
                              compute_dtype)
        values = {}
        with phase("losses"):
            for term_name in self.weights:
                term = TERMS[term_name]
                if term.per_partner:
                    per_partner = [term.compute(inputs(sides[partner])) for partner in self.partners[name]]
                    values[term_name] = per_partner[0] if len(per_partner) == 1 else add(per_partner) / len(per_partner)
                else:
                    values[term_name] = term.compute(inputs(None))
            return TermValues(values, self.total(name, values))

    def contributions(self, name: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each term as it enters network `name`'s total: w_t · term for a self term, λ_X · w_t · term for a
        partner term; they sum to the total (which `total` computes with fewer kernels)."""
        return {t: (self.lambdas[name] * w if TERMS[t].per_partner else w) * values[t] for t, w in self.weights.items()}

    def total(self, name: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
        own = [(w, values[t]) for t, w in self.weights.items() if not TERMS[t].per_partner]
        cross = [(w, values[t]) for t, w in self.weights.items() if TERMS[t].per_partner]
        if not cross:
            return weighted(own)
        if not own:
            return self.lambdas[name] * weighted(cross)
        return weighted(own) + self.lambdas[name] * weighted(cross)
