"""A request inside the engine: its tokens, how many of them are in the KV cache, its blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from executor_svc.engine.types import SamplingOptions


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """``token_ids`` = prompt + generated; the first ``num_computed`` have K/V in the cache.

    After preemption (recompute) ``num_computed`` drops to 0 and the whole of ``token_ids``
    is prefilled again; the generated tokens are kept, so the output continues seamlessly.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingOptions
    adapters: list[tuple[int, float]]
    max_tokens: int  # sampling.max_tokens capped by max_model_len
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    sink: object = None  # the engine's per-request output channel

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
