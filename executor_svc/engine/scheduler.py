"""Continuous batching with chunked prefill and recompute preemption.

Every step gets a token budget (``max_num_batched_tokens``) and is built in this order:

1. running sequences, oldest first: a decoding sequence takes 1 token, a sequence part-way
   through its prompt takes the next chunk (as much of the budget as is left). If its new
   tokens need a KV block and none is free, the youngest running sequence is preempted (its
   blocks freed; it goes back to the front of the queue and recomputes later).
2. waiting sequences, in arrival order, while the budget, ``max_num_seqs`` and the free KV
   blocks allow: admitted with their first prompt chunk.

So decodes never wait behind a long prompt: a 4,000-token prompt with a 512-token budget and
20 decoding requests runs as 20 decode tokens + 492 prompt tokens per step until it is done.

Running example (budget 8, block_size 4, 3 free blocks)::

    running: A decoding (needs no new block), B prefilled 4 of 10 prompt tokens
    waiting: C (5 prompt tokens)
    step: A 1 token, B 6 tokens (2 new blocks), C gets 1 token but needs a block: 1 left -> C 1
    -> ScheduledBatch(entries=[(A, 1), (B, 6), (C, 1)]); B and C sample nothing yet
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from executor_svc.engine.block_manager import BlockManager
from executor_svc.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class ScheduledBatch:
    entries: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, new tokens)
    # Each entry's block table as scheduled (copies). The step runs outside the engine's lock,
    # and abort() frees a sequence's blocks (``seq.block_table = []``) from another thread
    # at any time: the runner reads these copies, never the live lists.
    block_tables: list[list[int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, seq.num_computed + n)
                batch.entries.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing younger is left to run
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.entries.append((seq, n))
            budget -= n
        # Attention wants single-token (decode-shaped) entries first; then fresh prompt chunks
        # by length, so that prompts of one length sit side by side and share an attention
        # call (StepContext.prefill_runs), then chunks that continue a prompt.
        batch.entries.sort(key=lambda e: (e[1] != 1, e[1] > 1 and e[0].num_computed > 0, e[1]))
        batch.block_tables = [list(s.block_table) for s, _ in batch.entries]
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove ``seq`` wherever it is and free its blocks at once (idempotent)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
