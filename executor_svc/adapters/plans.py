"""A request's ``LoraPlan`` checked and turned into slot keys and per-slot weights.

    SELECTION (or one adapter)  -> [AdapterKey]                weights [1.0]
    MIXTURE                     -> [AdapterKey] * k (k <= 4)   weights as given
    FUSION                      -> [FusionKey(components)]     weights [1.0]
    no adapters                 -> []                          (the base model)

Checks, all reported together as BadRequest field violations: adapter ids present, no adapter
listed twice (same id and version, after resolving version 0), weights finite and not negative,
at most ``MAX_ADAPTERS_PER_TOKEN`` adapters in a mixture (the kernels' K), GATE refused until
gates are served. A plan whose weights are all 0 means "no preference": uniform weights 1/k.
Version 0 is resolved to the latest READY version through the store (NOT_FOUND propagates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from executor_svc.adapters.refs import AdapterKey, FusionKey, Key
from executor_svc.adapters.store import AdapterStore
from executor_svc.errors import invalid
from loraserve.api.v1 import common_pb2
from loraserve.errors import FieldViolation, Unimplemented

# The LoRA kernels gather at most 4 weighted adapters per token (kernels/metadata.py, max_k).
MAX_ADAPTERS_PER_TOKEN = 4

S = common_pb2.CompositionStrategy


@dataclass(frozen=True, slots=True)
class ResolvedPlan:
    keys: list[Key]
    weights: list[float]
    strategy: int = S.COMPOSITION_STRATEGY_UNSPECIFIED


def check_plan(plan: common_pb2.LoraPlan) -> list[FieldViolation]:
    """Static checks (no I/O): everything that can be wrong with the plan as written."""
    out: list[FieldViolation] = []
    items = list(plan.adapters)
    strategy = plan.strategy
    if strategy == S.COMPOSITION_STRATEGY_GATE:
        return out  # answered UNIMPLEMENTED by resolve_plan
    if strategy not in S.values():
        out.append(FieldViolation("plan.strategy", f"unknown strategy {strategy}"))
    if strategy == S.COMPOSITION_STRATEGY_SELECTION and len(items) > 1:
        out.append(FieldViolation("plan.adapters", "SELECTION takes exactly one adapter"))
    if strategy != S.COMPOSITION_STRATEGY_FUSION and len(items) > MAX_ADAPTERS_PER_TOKEN:
        out.append(
            FieldViolation(
                "plan.adapters",
                f"{len(items)} adapters; a mixture takes at most {MAX_ADAPTERS_PER_TOKEN}",
            )
        )
    seen: set[tuple[str, int]] = set()
    for i, a in enumerate(items):
        if not a.adapter_id:
            out.append(FieldViolation(f"plan.adapters[{i}].adapter_id", "empty"))
        if (a.adapter_id, a.version) in seen:
            out.append(
                FieldViolation(f"plan.adapters[{i}].adapter_id", f"{a.adapter_id} listed twice")
            )
        seen.add((a.adapter_id, a.version))
        if not math.isfinite(a.weight):
            out.append(FieldViolation(f"plan.adapters[{i}].weight", "must be finite"))
        elif a.weight < 0:
            out.append(FieldViolation(f"plan.adapters[{i}].weight", "must not be negative"))
    return out


async def resolve_plan(plan: common_pb2.LoraPlan, store: AdapterStore) -> ResolvedPlan:
    """Resolve versions and build the keys; call after :func:`check_plan` found nothing."""
    if plan.strategy == S.COMPOSITION_STRATEGY_GATE:
        raise Unimplemented("GATE plans are not served by this executor yet")
    items = list(plan.adapters)
    if not items:
        return ResolvedPlan([], [], plan.strategy)
    keys: list[AdapterKey] = []
    for a in items:
        keys.append((await store.resolve(a.adapter_id, a.version)).key)
    dupes = [
        FieldViolation(f"plan.adapters[{i}].adapter_id", f"{k} listed twice")
        for i, k in enumerate(keys)
        if k in keys[:i]
    ]
    if dupes:  # e.g. "a" at version 0 and "a" at version 3 when 3 is the latest
        raise invalid(dupes)
    weights = [float(a.weight) for a in items]
    if len(items) == 1 and plan.strategy != S.COMPOSITION_STRATEGY_MIXTURE:
        return ResolvedPlan(list(keys), [1.0], plan.strategy)
    if not any(weights):
        weights = [1.0 / len(items)] * len(items)
    if plan.strategy == S.COMPOSITION_STRATEGY_FUSION:
        fused = FusionKey(tuple(zip(keys, weights, strict=True)))
        return ResolvedPlan([fused], [1.0], plan.strategy)
    return ResolvedPlan(list(keys), weights, plan.strategy)
