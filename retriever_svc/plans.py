"""Composition plans: ranked candidates -> the ``LoraPlan`` an executor runs.

    SELECTION  top-1, weight 1
    MIXTURE    top-k, weights softmax(score / T) or uniform 1/k (LoraRetriever used 1/k)
    FUSION     top-k with the same weights; the executor averages their parameters (and caches)
    GATE       top-k handed to a trained gate (gate_id); the weights are the retrieval prior

Candidates scoring below ``min_score`` are left out of the plan; when none is left the plan is
the base model (no adapters) and ``below_min_score`` is set.

Example: scores [0.62, 0.55, 0.21], k=3, T=0.05, min_score=0.3, MIXTURE+SOFTMAX ->
adapters [a0, a1] with weights softmax([12.4, 11.0]) = [0.80, 0.20]; a2 is below min_score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from loraserve.api.v1 import common_pb2
from retriever_svc.scoring import Scored

Strategy = common_pb2.CompositionStrategy


class Weighting(IntEnum):
    """Mirrors ``retriever_pb2.MixtureWeighting`` (same numbers)."""

    SOFTMAX = 1
    UNIFORM = 2


@dataclass(frozen=True, slots=True)
class PlanOptions:
    strategy: int  # a CompositionStrategy value other than UNSPECIFIED
    top_k: int
    weighting: Weighting
    temperature: float
    min_score: float
    gate_id: str = ""


def mixture_weights(
    scores: Sequence[float], weighting: Weighting, temperature: float
) -> list[float]:
    """Weights summing to 1: softmax(score / T) (max-shifted) or 1/k."""
    if not scores:
        return []
    if weighting is Weighting.UNIFORM:
        return [1.0 / len(scores)] * len(scores)
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def build_plan(ranked: Sequence[Scored], opts: PlanOptions) -> tuple[common_pb2.LoraPlan, bool]:
    """The plan for one prompt and whether it fell back to the base model (below min score)."""
    plan = common_pb2.LoraPlan(strategy=opts.strategy)
    size = 1 if opts.strategy == Strategy.COMPOSITION_STRATEGY_SELECTION else opts.top_k
    chosen = [c for c in ranked[:size] if c.score >= opts.min_score]
    if not chosen:
        return plan, True
    weights = (
        [1.0]
        if len(chosen) == 1
        else mixture_weights([c.score for c in chosen], opts.weighting, opts.temperature)
    )
    for cand, weight in zip(chosen, weights, strict=True):
        plan.adapters.add(adapter_id=cand.adapter_id, version=cand.version, weight=weight)
    if opts.strategy == Strategy.COMPOSITION_STRATEGY_GATE:
        plan.gate_id = opts.gate_id
    return plan, False
