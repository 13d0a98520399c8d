"""Request checks: every problem of a request reported at once, as BadRequest violations.

Zero-valued fields take the server defaults (proto3: 0 = unset). ``top_k`` is a uint32 on the
wire, so "k <= 0" can only be 0, which means the default; k over ``max_top_k`` is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraserve.api.v1 import common_pb2, retriever_pb2
from loraserve.errors import FailedPrecondition, FieldViolation, InvalidArgument
from retriever_svc.plans import PlanOptions, Weighting
from retriever_svc.scoring import Mode
from retriever_svc.search import SearchFilter
from retriever_svc.settings import RetrieverSettings

Strategy = common_pb2.CompositionStrategy
MAX_FILTER_IDS = 1000
MAX_FILTER_TAGS = 32


@dataclass(frozen=True, slots=True)
class Query:
    prompts: list[str]
    search: SearchFilter
    mode: Mode
    plan: PlanOptions
    top_k: int


def check_retrieve(req: retriever_pb2.RetrieveRequest, s: RetrieverSettings) -> Query:
    bad: list[FieldViolation] = []
    prompts = list(req.prompts)
    if not prompts:
        bad.append(FieldViolation("prompts", "at least one prompt is required"))
    elif len(prompts) > s.max_prompts:
        bad.append(FieldViolation("prompts", f"{len(prompts)} prompts; at most {s.max_prompts}"))
    for i, p in enumerate(prompts[: s.max_prompts]):
        bad += _prompt_violations(f"prompts[{i}]", p, s)
    bad += _base_model_violations(req.base_model)
    strategy = req.strategy or Strategy.Value(f"COMPOSITION_STRATEGY_{s.default_strategy}")
    if strategy not in Strategy.values():
        bad.append(FieldViolation("strategy", f"unknown composition strategy {req.strategy}"))
    top_k = req.top_k or s.default_top_k
    if top_k > s.max_top_k:
        bad.append(FieldViolation("top_k", f"{top_k} is over the cap of {s.max_top_k}"))
    elif strategy == Strategy.COMPOSITION_STRATEGY_MIXTURE and top_k > s.max_mixture_adapters:
        bad.append(
            FieldViolation(
                "top_k",
                f"a MIXTURE composes at most {s.max_mixture_adapters} adapters (the executor's "
                f"adapters per token); got {top_k}",
            )
        )
    mode = _mode(req.scoring, s, bad, "scoring")
    weighting = _weighting(req.weighting, s, bad)
    temperature = req.temperature or s.default_temperature
    if not math.isfinite(temperature) or temperature <= 0:
        bad.append(FieldViolation("temperature", "must be a positive finite number"))
    min_score = req.min_score if req.HasField("min_score") else s.default_min_score
    if not math.isfinite(min_score):
        bad.append(FieldViolation("min_score", "must be finite"))
    search = _search_filter(req.base_model, req.filter, bad)
    if bad:
        raise InvalidArgument(f"invalid RetrieveRequest: {_summary(bad)}", bad)
    if strategy == Strategy.COMPOSITION_STRATEGY_GATE and not s.gate_id:
        raise FailedPrecondition(
            "GATE plans need a trained gate: none configured (LORASERVE_RETRIEVER_GATE_ID; "
            "train one with JobService.TrainGate)"
        )
    plan = PlanOptions(strategy, top_k, weighting, temperature, min_score, s.gate_id)
    return Query(prompts, search, mode, plan, top_k)


def check_explain(req: retriever_pb2.ExplainRequest, s: RetrieverSettings) -> Query:
    bad = _prompt_violations("prompt", req.prompt, s) + _base_model_violations(req.base_model)
    top_n = req.top_n or s.default_top_n
    if top_n > s.max_top_k:
        bad.append(FieldViolation("top_n", f"{top_n} is over the cap of {s.max_top_k}"))
    mode = _mode(req.scoring, s, bad, "scoring")
    search = _search_filter(req.base_model, req.filter, bad)
    if bad:
        raise InvalidArgument(f"invalid ExplainRequest: {_summary(bad)}", bad)
    plan = PlanOptions(
        Strategy.COMPOSITION_STRATEGY_SELECTION, 1, Weighting.SOFTMAX, 1.0, s.default_min_score
    )
    return Query([req.prompt], search, mode, plan, top_n)


def check_route(req: retriever_pb2.RouteRequest) -> None:
    bad: list[FieldViolation] = []
    for i, a in enumerate(req.plan.adapters):
        if not a.adapter_id:
            bad.append(FieldViolation(f"plan.adapters[{i}].adapter_id", "empty"))
    if bad:
        raise InvalidArgument(f"invalid RouteRequest: {_summary(bad)}", bad)


def _prompt_violations(name: str, prompt: str, s: RetrieverSettings) -> list[FieldViolation]:
    if not prompt.strip():
        return [FieldViolation(name, "empty prompt")]
    if len(prompt) > s.max_prompt_chars:
        return [FieldViolation(name, f"{len(prompt)} characters; at most {s.max_prompt_chars}")]
    return []


def _base_model_violations(base_model: str) -> list[FieldViolation]:
    return [] if base_model else [FieldViolation("base_model", "required")]


def _mode(value: int, s: RetrieverSettings, bad: list[FieldViolation], name: str) -> Mode:
    if value == 0:
        return Mode[s.default_scoring]
    if value not in {m.value for m in Mode}:
        bad.append(FieldViolation(name, f"unknown scoring mode {value}"))
        return Mode.CENTROID
    return Mode(value)


def _weighting(value: int, s: RetrieverSettings, bad: list[FieldViolation]) -> Weighting:
    if value == 0:
        return Weighting[s.default_weighting]
    if value not in {w.value for w in Weighting}:
        bad.append(FieldViolation("weighting", f"unknown mixture weighting {value}"))
        return Weighting.SOFTMAX
    return Weighting(value)


def _search_filter(
    base_model: str, flt: retriever_pb2.RetrievalFilter, bad: list[FieldViolation]
) -> SearchFilter:
    if len(flt.adapter_ids) > MAX_FILTER_IDS:
        bad.append(FieldViolation("filter.adapter_ids", f"at most {MAX_FILTER_IDS} ids"))
    if len(flt.tags) > MAX_FILTER_TAGS:
        bad.append(FieldViolation("filter.tags", f"at most {MAX_FILTER_TAGS} tags"))
    for i, a in enumerate(flt.adapter_ids):
        if not a:
            bad.append(FieldViolation(f"filter.adapter_ids[{i}]", "empty"))
    return SearchFilter(base_model, list(flt.tags), flt.domain, list(flt.adapter_ids))


def _summary(bad: list[FieldViolation]) -> str:
    head = "; ".join(f"{v.field}: {v.description}" for v in bad[:3])
    return head + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else "")
