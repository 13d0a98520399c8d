"""Paged KV-cache bookkeeping: fixed-size blocks handed out from a free list.

The cache of every layer is ``[num_blocks * block_size, kv_heads, head_dim]``; a sequence owns
a list of blocks (its block table) and token ``p`` of it lives in flat row
``block_table[p // block_size] * block_size + p % block_size``.

Running example (block_size 4, 6 blocks; block 0 is reserved as the scratch block that CUDA
graph padding rows write to, so 5 are usable)::

    free = [1, 2, 3, 4, 5]
    A: 6 tokens   -> allocate(A, 6)  -> A.block_table = [1, 2], free = [3, 4, 5]
    B: 3 tokens   -> allocate(B, 3)  -> B.block_table = [3],    free = [4, 5]
    A: 7th token  -> allocate(A, 7)  -> fits in block 2 (rows 8..11), nothing new
    B finishes    -> free(B)         -> free = [4, 5, 3]
"""

from __future__ import annotations

from collections import deque

from executor_svc.engine.sequence import Sequence

SCRATCH_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"KV cache of {num_blocks} blocks is too small")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` still needs so that its first ``num_tokens`` tokens have rows."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.extra_blocks(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.extra_blocks(seq, num_tokens)
        if n > len(self._free):
            raise RuntimeError("KV cache exhausted (caller must check can_allocate)")
        seq.block_table.extend(self._free.popleft() for _ in range(n))

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
