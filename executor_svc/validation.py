"""Checks of a Generate / GenerateStream request before any work is done for it.

Every problem is collected and reported at once as INVALID_ARGUMENT with one BadRequest field
violation per problem (field paths as in the proto: ``sampling.top_p``, ``plan.adapters[1]``).
Zero values of SamplingParams mean the documented defaults: ``max_tokens=0`` is the server's
``default_max_tokens``; ``top_p`` 0 or 1 disables nucleus sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from executor_svc.adapters.plans import check_plan
from executor_svc.engine.types import SamplingOptions
from executor_svc.errors import invalid
from executor_svc.settings import ExecutorSettings
from loraserve.api.v1 import common_pb2
from loraserve.errors import FieldViolation

MAX_REQUEST_ID_LENGTH = 128


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    sampling: SamplingOptions
    prompt_token_ids: list[int]


def check_request(
    request_id: str,
    prompt: str,
    plan: common_pb2.LoraPlan,
    params: common_pb2.SamplingParams,
    settings: ExecutorSettings,
    max_model_len: int,
    tokenize: Callable[[str], list[int]],
) -> CheckedRequest:
    """Validate and build the engine's SamplingOptions; the prompt is tokenized once, here."""
    bad: list[FieldViolation] = []
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        bad.append(FieldViolation("request_id", f"longer than {MAX_REQUEST_ID_LENGTH} chars"))
    ids: list[int] = []
    if not prompt:
        bad.append(FieldViolation("prompt", "empty"))
    else:
        ids = list(tokenize(prompt))
        if not ids:
            bad.append(FieldViolation("prompt", "no tokens"))
        if len(ids) >= max_model_len:  # at least one generated token must fit after it
            bad.append(
                FieldViolation("prompt", f"{len(ids)} tokens; max_model_len is {max_model_len}")
            )
    max_tokens = params.max_tokens or settings.default_max_tokens
    if params.max_tokens > settings.max_tokens:
        bad.append(FieldViolation("sampling.max_tokens", f"above the cap of {settings.max_tokens}"))
    if not math.isfinite(params.temperature) or params.temperature < 0:
        bad.append(FieldViolation("sampling.temperature", "must be finite and >= 0"))
    if not math.isfinite(params.top_p) or not 0.0 <= params.top_p <= 1.0:
        bad.append(FieldViolation("sampling.top_p", "must be in [0, 1]"))
    if params.min_tokens > max_tokens:
        bad.append(FieldViolation("sampling.min_tokens", f"above max_tokens ({max_tokens})"))
    if len(params.stop) > settings.max_stop_strings:
        bad.append(
            FieldViolation("sampling.stop", f"more than {settings.max_stop_strings} stop strings")
        )
    for i, stop in enumerate(params.stop):
        if not stop or len(stop) > settings.max_stop_length:
            bad.append(
                FieldViolation(
                    f"sampling.stop[{i}]", f"must be 1..{settings.max_stop_length} characters"
                )
            )
    bad.extend(check_plan(plan))
    if bad:
        raise invalid(bad)
    # The KV cache holds max_model_len positions per request: generate no further than that.
    max_tokens = min(max_tokens, max_model_len - len(ids))
    sampling = SamplingOptions(
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=params.top_p if 0.0 < params.top_p < 1.0 else 1.0,
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else None,
        stop=list(params.stop),
        min_tokens=min(params.min_tokens, max_tokens),
    )
    return CheckedRequest(sampling, ids)
