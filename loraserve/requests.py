"""Request builders and result types shared by the sync and async SDK clients."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loraserve.api.v1 import common_pb2, executor_pb2, registry_pb2, retriever_pb2
from loraserve.errors import InvalidArgument

STRATEGIES = {
    "selection": common_pb2.COMPOSITION_STRATEGY_SELECTION,
    "mixture": common_pb2.COMPOSITION_STRATEGY_MIXTURE,
    "fusion": common_pb2.COMPOSITION_STRATEGY_FUSION,
    "gate": common_pb2.COMPOSITION_STRATEGY_GATE,
}
FINISH_REASONS = {
    executor_pb2.FINISH_REASON_LENGTH: "length",
    executor_pb2.FINISH_REASON_EOS: "eos",
    executor_pb2.FINISH_REASON_STOP: "stop",
    executor_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
STATUS_NAMES = {v: k.removeprefix("ADAPTER_STATUS_") for k, v in common_pb2.AdapterStatus.items()}

PlanLike = common_pb2.LoraPlan | Sequence[tuple[str, float]] | None


@dataclass(slots=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float
    plan: common_pb2.LoraPlan
    replica: str = ""


@dataclass(slots=True)
class StreamChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_ms: float | None = None
    plan: common_pb2.LoraPlan | None = None
    extra: dict = field(default_factory=dict)


def strategy_value(strategy: str | int | None) -> int:
    if strategy is None:
        return common_pb2.COMPOSITION_STRATEGY_UNSPECIFIED
    if isinstance(strategy, int):
        return strategy
    try:
        return STRATEGIES[strategy.lower()]
    except KeyError:
        raise InvalidArgument.field("strategy", f"one of {sorted(STRATEGIES)}") from None


def to_plan(plan: PlanLike, strategy: str | int | None = None) -> common_pb2.LoraPlan | None:
    """A LoraPlan from a proto, a list of (adapter_id, weight) pairs, or None (retrieve one)."""
    if plan is None or isinstance(plan, common_pb2.LoraPlan):
        return plan
    adapters = [common_pb2.WeightedAdapter(adapter_id=a, weight=float(w)) for a, w in plan]
    default = "selection" if len(adapters) == 1 else "mixture"
    return common_pb2.LoraPlan(strategy=strategy_value(strategy or default), adapters=adapters)


def sampling(
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    min_tokens: int = 0,
) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop),
        min_tokens=min_tokens,
    )
    if seed is not None:
        params.seed = seed
    return params


def retrieve_request(
    prompts: Sequence[str],
    base_model: str,
    top_k: int = 0,
    strategy: str | int | None = None,
    **filters,
) -> retriever_pb2.RetrieveRequest:
    return retriever_pb2.RetrieveRequest(
        prompts=list(prompts),
        base_model=base_model,
        top_k=top_k,
        strategy=strategy_value(strategy),
        filter=retriever_pb2.RetrievalFilter(
            tags=list(filters.get("tags", ())),
            domain=filters.get("domain", ""),
            adapter_ids=list(filters.get("adapter_ids", ())),
        ),
    )


def push_header(
    adapter_dir: str | Path,
    adapter_id: str,
    base_model: str,
    *,
    version: int = 0,
    tags: Sequence[str] = (),
    domain: str = "",
    sample_inputs: Sequence[str] | None = None,
    description: str = "",
) -> registry_pb2.PushAdapterHeader:
    """The upload header; sample inputs default to ``sample_inputs.json`` beside the adapter."""
    path = Path(adapter_dir)
    if sample_inputs is None:
        samples_file = path / "sample_inputs.json"
        sample_inputs = json.loads(samples_file.read_text()) if samples_file.exists() else []
    return registry_pb2.PushAdapterHeader(
        adapter_id=adapter_id,
        version=version,
        base_model=base_model,
        tags=list(tags),
        domain=domain,
        sample_inputs=list(sample_inputs),
        description=description,
    )


def base_model_request(
    base_model_id: str, model_dir_or_config: str | Path
) -> registry_pb2.RegisterBaseModelRequest:
    """RegisterBaseModel from a checkpoint dir (its config.json) or a config.json path."""
    path = Path(model_dir_or_config)
    config = path / "config.json" if path.is_dir() else path
    return registry_pb2.RegisterBaseModelRequest(
        base_model_id=base_model_id, config_json=config.read_text()
    )


def generate_result(
    resp: executor_pb2.GenerateResponse, plan: common_pb2.LoraPlan, replica: str
) -> GenerateResult:
    return GenerateResult(
        text=resp.text,
        token_ids=list(resp.token_ids),
        finish_reason=FINISH_REASONS.get(resp.finish_reason, ""),
        prompt_tokens=resp.usage.prompt_tokens,
        completion_tokens=resp.usage.completion_tokens,
        time_to_first_token_ms=resp.time_to_first_token_ms,
        plan=plan,
        replica=replica,
    )


def stream_chunk(
    resp: executor_pb2.GenerateStreamResponse, plan: common_pb2.LoraPlan
) -> StreamChunk:
    return StreamChunk(
        text=resp.text,
        token_ids=list(resp.token_ids),
        finish_reason=FINISH_REASONS.get(resp.finish_reason) if resp.finish_reason else None,
        prompt_tokens=resp.usage.prompt_tokens,
        completion_tokens=resp.usage.completion_tokens,
        time_to_first_token_ms=resp.time_to_first_token_ms or None,
        plan=plan,
    )
