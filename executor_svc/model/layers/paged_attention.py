"""Attention over the paged KV cache.

KV cache layout per layer: ``k_cache, v_cache: [num_blocks * block_size, num_kv_heads,
head_dim]`` (a flat row per token slot; row = block * block_size + offset).

Decode (one query token per sequence) reads the sequence's rows through its block table.
Semantics, for sequence b and query head h (GQA: KV head h // group):

    ctx = context_lens[b]                       # tokens to attend to, the new one included
    rows = [block_tables[b, p // block_size] * block_size + p % block_size for p < ctx]
    out[b, h] = softmax(scale * q[b, h] @ K[rows, h // group].T) @ V[rows, h // group]

On CUDA a Triton kernel, flash-decoding style: one program per (sequence, KV head, context
split); the GQA group's query heads share each K/V tile; online softmax over tiles of
``TILE`` tokens. With more than one split, each program writes its split's running max, sum
and unnormalised output, and a second kernel combines the splits (``_combine_kernel``). The
split count is chosen per launch from the batch, the KV heads and the block-table width
(``decode_splits``), never from the lengths themselves: the kernels read their loop bounds
from ``context_lens`` on the device, so a launch can be captured in a CUDA graph and replayed
for any lengths (the splits then divide whatever context each row has). One program per
(sequence, KV head) left the GPU mostly idle at small batches: a 4,096-token context at batch
1 read its KV at 0.55 TB/s (docs/benchmarks.md, tenth pass). On CPU the same semantics in
torch (gather + SDPA with a length mask).
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
# decode_splits: about this many (sequence, KV head, split) programs, two per SM of the H100's
# 132 (on the H100 a launch of 256 programs read a 4,096-token context at 2.77 TB/s, and more
# splits only added the combine; 32 programs read it at 0.55 TB/s), and at most this many splits
# of one sequence's context (16 and 8 were within 2%).
TARGET_PROGRAMS = 256
MAX_SPLITS = 16


def decode_splits(batch: int, kv_heads: int, max_context: int, tile: int = TILE) -> int:
    """Context splits per (sequence, KV head): a power of two, so that the launch has about
    ``TARGET_PROGRAMS`` programs, but no more splits than ``max_context`` (the block table's
    width in tokens) has tiles, and at most ``MAX_SPLITS``."""
    want = -(-TARGET_PROGRAMS // max(1, batch * kv_heads))
    most = min(MAX_SPLITS, max(1, -(-max_context // tile)))
    splits = 1
    while splits < want and splits * 2 <= most:
        splits *= 2
    return splits


@triton.jit
def attend_tile(q, k_ptrs, v_ptrs, kv_mask, visible, m_i, l_i, acc, scale):
    """One online-softmax step of flash attention over a tile of keys (shared by the decode and
    prefill kernels): q [M, D]; K/V rows at ``k_ptrs``/``v_ptrs`` [N, D] loaded under
    ``kv_mask`` (0 elsewhere); ``visible`` [M, N] the (query, key) pairs that attend; m_i, l_i
    [M] the running max and sum, acc [M, D] the unnormalised output. Returns them updated.
    A row must see at least one key over the whole loop (its max stays -inf until then)."""
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


# stride_bt is the width of the step's block tables: eager steps size it to their longest table,
# so a specialisation on it (== 1, multiple of 16) would compile variants while serving.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode_kernel(
    Q,
    K,
    V,
    Out,
    PartMax,
    PartSum,
    PartOut,
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
    DP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens + seq)
    # this split's tiles: the context's tiles dealt out in equal runs (the last may be short
    # or empty)
    per_split = tl.cdiv(tl.cdiv(ctx, TILE), SPLITS) * TILE
    first = split * per_split
    last = tl.minimum(first + per_split, ctx)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DP)  # head_dim padded to a power of two; dmask keeps the real columns
    dmask = d < D
    gmask = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(
        Q + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DP], tl.float32)
    offs = tl.arange(0, TILE)
    for start in range(first, last, TILE):
        pos = start + offs
        valid = pos < last
        blk = tl.load(block_tables + seq * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        rows = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = rows[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        m_i, l_i, acc = attend_tile(
            q, K + kv_off, V + kv_off, valid[:, None] & dmask[None, :], valid[None, :],
            m_i, l_i, acc, scale,
        )  # fmt: skip
    if SPLITS == 1:
        tl.store(
            Out + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
            (acc / l_i[:, None]).to(Out.dtype.element_ty),
            mask=gmask[:, None] & dmask[None, :],
        )
    else:  # partials at [(seq * num_heads + head) * SPLITS + split]; an empty split: -inf, 0, 0
        part = (seq * tl.num_programs(1) * GROUP + heads) * SPLITS + split
        tl.store(PartMax + part, m_i, mask=gmask)
        tl.store(PartSum + part, l_i, mask=gmask)
        tl.store(
            PartOut + part[:, None] * D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :]
        )


@triton.jit
def _combine_kernel(
    PartMax,
    PartSum,
    PartOut,
    Out,
    stride_ot,
    stride_oh,
    D: tl.constexpr,
    DP: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """out[b, h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s (split 0
    always holds tokens, so M is finite and the empty splits weigh e^-inf = 0)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    part = (seq * tl.num_programs(1) + head) * SPLITS + tl.arange(0, SPLITS)
    d = tl.arange(0, DP)
    dmask = d < D
    m = tl.load(PartMax + part)
    w = tl.exp(m - tl.max(m, 0))
    total = tl.sum(tl.load(PartSum + part) * w, 0)
    parts = tl.load(PartOut + part[:, None] * D + d[None, :], mask=dmask[None, :], other=0.0)
    acc = tl.sum(parts * w[:, None], 0)
    out = (acc / total).to(Out.dtype.element_ty)
    tl.store(Out + seq * stride_ot + head * stride_oh + d, out, mask=dmask)


_launch_paged_decode = Launcher(_paged_decode_kernel, unspecialized=("stride_bt",))
_launch_combine = Launcher(_combine_kernel)


def paged_decode_triton(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    scale,
    block_size,
    *,
    splits: int | None = None,
    tile: int = TILE,
    num_warps: int = 4,
):
    """q: [B, Hq, D] -> [B, Hq, D]; see the module docstring. ``splits`` (a power of two)
    overrides ``decode_splits``; ``splits``, ``tile`` and ``num_warps`` are there for
    bench/attention_bench.py's sweep."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    out = torch.empty_like(q)
    if b == 0:
        return out
    if splits is None:
        splits = decode_splits(b, hkv, block_tables.shape[1] * block_size, tile)
    if splits > 1:
        part_max = torch.empty(b * hq * splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty(b * hq * splits, d, dtype=torch.float32, device=q.device)
    else:  # unused: the kernel writes ``out`` directly
        part_max = part_sum = part_out = out
    _launch_paged_decode(
        (b, hkv, splits),
        (
            q,
            k_cache,
            v_cache,
            out,
            part_max,
            part_sum,
            part_out,
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
            "DP": max(16, triton.next_power_of_2(d)),
            "BLOCK_SIZE": block_size,
            "TILE": tile,
            "SPLITS": splits,
        },
        {"num_warps": num_warps},
    )
    if splits > 1:
        _launch_combine(
            (b, hq),
            (part_max, part_sum, part_out, out, out.stride(0), out.stride(1)),
            {"D": d, "DP": max(16, triton.next_power_of_2(d)), "SPLITS": splits},
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
