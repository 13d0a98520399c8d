"""The engine's public types: the one interface between the serving layer and the engine core.

The serving layer (executor_svc/server.py, executor_svc/adapters/) resolves a request's LoRA
plan to GPU slots *before* submitting it, holds the slot references while the request runs,
and releases them when the request's event stream ends (normally, by error or by cancel).
The engine only ever sees slot indices and weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingOptions:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt: str
    # (slot, weight) pairs, at most 4; empty = base model.
    adapters: list[tuple[int, float]]
    sampling: SamplingOptions
    # Already tokenized prompt; when set, ``prompt`` is ignored (benchmarks, token-level APIs).
    prompt_token_ids: list[int] | None = None


@dataclass(slots=True)
class TokenEvent:
    """One step's output for a request; the last one has finish_reason set."""

    request_id: str
    token_ids: list[int]
    text: str  # newly decoded text (incremental detokenization)
    finish_reason: str | None = None  # "length" | "eos" | "stop" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_ms: float | None = None


@dataclass(slots=True)
class LoraModuleWeights:
    """One target module of one layer: delta = scale * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scale: float


# AdapterWeights[layer_index][module_short_name] -> LoraModuleWeights, e.g. [0]["q_proj"].
AdapterWeights = dict[int, dict[str, LoraModuleWeights]]


@dataclass(slots=True)
class EngineStats:
    queue_depth: int
    running_requests: int
    kv_blocks_total: int
    kv_blocks_free: int
    requests_completed: int
    tokens_generated: int
    device: str
    merged_slot: int | None = None  # adapter slot folded into the base weights (merged mode)
    merge_switches: int = 0  # merges and unmerges so far
