"""What one forward step needs besides the token ids: positions, KV slots, attention layout,
and the LoRA metadata shared by every layer.

Token order in a step: decode tokens first (one per sequence), then prefill chunks.
Running example (block_size 4, flat KV row = block * 4 + offset)::

    seq A decoding its 6th token (blocks [3, 7]), seq B prefilling tokens 0..2 (block [5])
    input_ids     = [a5, b0, b1, b2]
    positions     = [5, 0, 1, 2]
    slot_mapping  = [7*4+1, 5*4+0, 5*4+1, 5*4+2] = [29, 20, 21, 22]
    num_decode    = 1;  block_tables = [[3, 7]];  context_lens = [6]
    prefills      = [PrefillChunk(start=1, length=3, kv_rows=None, mask=None)]  # no history
    logits_index  = [0, 3]   # last token of each sequence that samples this step

A prefill chunk that continues an earlier chunk (chunked prefill) has ``kv_rows``: the flat
KV rows of its whole context (history + chunk), and ``mask`` [length, context] (causal with
the chunk's offset). Those serve the SDPA path; on CUDA the engine instead builds
``prefill_meta`` (executor_svc.model.layers.paged_prefill): the chunks' query tiles and block
tables, with which one kernel a layer does every chunk's attention through the paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from executor_svc.model.layers.paged_prefill import PrefillMeta
from kernels import LoraBatchMeta


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first token of the chunk in the step's token order
    length: int
    kv_rows: torch.Tensor | None = None  # [context] int64 flat KV rows; None = no history
    mask: torch.Tensor | None = None  # [length, context] bool, True = attend


@dataclass(slots=True)
class PrefillRun:
    """``count`` back-to-back prefill chunks of ``length`` tokens each from ``start``, none with
    history (one attention call for all of them), or one chunk with history (``chunk``)."""

    start: int
    length: int
    count: int = 1
    chunk: PrefillChunk | None = None


@dataclass(slots=True)
class StepContext:
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64 flat KV row written by each token
    num_decode: int = 0
    block_tables: torch.Tensor | None = None  # [num_decode, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [num_decode] int32, including the new token
    prefills: list[PrefillChunk] = field(default_factory=list)
    lora: LoraBatchMeta | None = None
    block_size: int = 16
    prefill_meta: PrefillMeta | None = None  # set: every prefill chunk in one kernel a layer
    _runs: list[PrefillRun] | None = None  # prefill_runs(), worked out once per step

    def prefill_runs(self) -> list[PrefillRun]:
        """The prefill chunks as attention calls: adjacent fresh chunks of one length share a
        call (a batch of equal sequences), a chunk with history gets its own. Worked out once
        per step; every layer reuses it."""
        if self._runs is None:
            runs: list[PrefillRun] = []
            for p in self.prefills:
                last = runs[-1] if runs else None
                if p.kv_rows is not None:
                    runs.append(PrefillRun(p.start, p.length, chunk=p))
                elif (
                    last is not None
                    and last.chunk is None
                    and last.length == p.length
                    and last.start + last.count * last.length == p.start
                ):
                    last.count += 1
                else:
                    runs.append(PrefillRun(p.start, p.length))
            self._runs = runs
        return self._runs
