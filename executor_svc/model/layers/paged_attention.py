"""Attention over the paged KV cache.

KV cache layout per layer: ``k_cache, v_cache: [num_blocks * block_size, num_kv_heads,
head_dim]`` (a flat row per token slot; row = block * block_size + offset).

Decode (one query token per sequence) reads the sequence's rows through its block table:
on CUDA a Triton kernel (one program per (sequence, kv head); the GQA group's query heads
share each K/V tile, online softmax over tiles of 64 tokens, flash-decoding style without the
split over the context); on CPU the same thing in torch (gather + SDPA with a length mask).
The kernel reads its loop bound from ``context_lens`` on the device, so it can be captured
in a CUDA graph and replayed for any lengths.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels._launch import Launcher  # noqa: E402

TILE = 64  # tokens per loop iteration: 4 blocks of 16, 16 KB of K and of V per load at D=128


@triton.jit
def _paged_decode_kernel(
    Q,
    K,
    V,
    Out,
    block_tables,
    context_lens,
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(
        Q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    offs = tl.arange(0, TILE)
    for start in range(0, ctx, TILE):
        pos = start + offs
        valid = pos < ctx
        blk = tl.load(block_tables + seq * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        rows = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = rows[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        k = tl.load(K + kv_off, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        Out + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=gmask[:, None],
    )


_launch_paged_decode = Launcher(_paged_decode_kernel)


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, block_size):
    """q: [B, Hq, D] -> [B, Hq, D]; see the module docstring for the cache layout."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    out = torch.empty_like(q)
    if b == 0:
        return out
    _launch_paged_decode(
        (b, hkv),
        (
            q,
            k_cache,
            v_cache,
            out,
            block_tables,
            context_lens,
            scale,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
        ),
        {
            "GROUP": group,
            "GROUP_PAD": max(16, triton.next_power_of_2(group)),
            "D": d,
            "BLOCK_SIZE": block_size,
            "TILE": TILE,
        },
        {"num_warps": 4},
    )
    return out


def paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale, block_size):
    """Reference / CPU path: gather every sequence's rows (padded to the longest) + SDPA."""
    max_len = block_tables.shape[1] * block_size
    pos = torch.arange(max_len, device=q.device)
    rows = block_tables.long()[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    k = k_cache[rows].transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[rows].transpose(1, 2)
    mask = (pos[None, :] < context_lens[:, None].long())[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, block_size):
    fn = paged_decode_triton if q.is_cuda else paged_decode_torch
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale, block_size)
