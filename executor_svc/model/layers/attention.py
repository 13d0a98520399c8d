"""Self-attention of one decoder layer over the paged KV cache (see paged_attention.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from executor_svc.model.context import StepContext
from executor_svc.model.layers.paged_attention import paged_decode
from executor_svc.model.layers.paged_prefill import paged_prefill_triton

# SDPA's backends for prefill, cuDNN's left out. PyTorch picks cuDNN's attention first on the
# H100, and it builds an execution plan on the host for every new shape (sequences x length):
# 35-44 ms each, on the step thread, so every prompt of a length not seen before stalled
# the whole batch (up to 0.6 s a step under open-loop traffic; flash attention's first call
# at a new shape took 2 ms, docs/benchmarks.md, eleventh pass).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        ctx: StepContext,
        *,
        write_kv: bool = True,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] (rotated) -> [T, Hq, D]. Writes k/v to the cache
        rows ``ctx.slot_mapping`` first, unless ``write_kv`` is False (the caller's RoPE
        launch wrote them: executor_svc.model.layers.rotary)."""
        k_cache, v_cache = kv_cache
        if write_kv:
            k_cache.index_copy_(0, ctx.slot_mapping, k)
            v_cache.index_copy_(0, ctx.slot_mapping, v)
        nd = ctx.num_decode
        if not ctx.prefills:
            return paged_decode(
                q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, self.scale, ctx.block_size
            )
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_decode(
                q[:nd],
                k_cache,
                v_cache,
                ctx.block_tables,
                ctx.context_lens,
                self.scale,
                ctx.block_size,
            )
        if ctx.prefill_meta is not None:  # every chunk, any lengths and histories: one launch
            return paged_prefill_triton(
                q, k_cache, v_cache, ctx.prefill_meta, self.scale, ctx.block_size, out
            )
        # One call per run of equal fresh prompts (a batch), not one per prompt: a step of 16
        # prompts made 16 calls a layer, ~25 ms of host time for a 2,048-token step.
        for run in ctx.prefill_runs():
            n, length = run.count, run.length
            sl = slice(run.start, run.start + n * length)
            p = run.chunk
            if p is None:
                ks, vs, mask, causal = k[sl], v[sl], None, True
            else:
                ks, vs, mask, causal = k_cache[p.kv_rows], v_cache[p.kv_rows], p.mask, False
            with sdpa_kernel(SDPA_BACKENDS):
                o = F.scaled_dot_product_attention(
                    _heads_first(q[sl], n),
                    _heads_first(ks, n),
                    _heads_first(vs, n),
                    attn_mask=mask,
                    is_causal=causal,
                    scale=self.scale,
                    enable_gqa=True,
                )
            out[sl] = o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3])
        return out


def _heads_first(x: torch.Tensor, n: int) -> torch.Tensor:
    """[n * L, H, D] (n sequences of L tokens, back to back) -> [n, H, L, D], a view."""
    return x.view(n, -1, *x.shape[1:]).transpose(1, 2)
