"""Prefill attention for every prompt chunk of a step in one launch, over the paged KV cache.

Semantics, for prefill chunk c (``length`` query tokens from step token ``start``, of a
sequence with ``history`` tokens already in the cache and block-table row ``table``) and query
head h (GQA: KV head h // group), once the step's own K/V rows are in the cache:

    for i in range(length):                     # query token at position history + i
        rows = [table[p // block_size] * block_size + p % block_size for p <= history + i]
        out[start + i, h] = softmax(scale * q[start + i, h] @ K[rows, h // group].T) @ V[rows, ...]

A fresh prompt (history 0) is causal self-attention; a chunk that continues a prompt attends
to its whole history too. On CUDA one Triton kernel does every chunk of the step, whatever
the lengths: one program per (tile of 64 or 128 query tokens of one chunk, query head),
flash-attention style (online softmax over tiles of ``BLOCK_N`` keys read through the block
table, up to the tile's last query position). The tiles come from ``build_prefill_meta``,
once per step, shared by every layer. Without it (the CPU path, and ``batch_logits``' contiguous
cache rows) attention runs as SDPA calls, one per run of equal fresh prompts and one per chunk
with history (executor_svc.model.layers.attention).

Running example (block_size 4, query tiles of 4 tokens): the step holds one decode token,
then chunk A (6 fresh tokens of a prompt, blocks [5, 2]) and chunk B (3 tokens continuing a
prompt with 5 in the cache, blocks [7, 1])::

    chunks:  A start=1 length=6 history=0 table row 0;  B start=7 length=3 history=5 row 1
    tiles:   [start, q_offset, length, history, row]
             [1, 0, 6, 0, 0]   A's tokens 0-3 (keys 0-3)
             [1, 4, 6, 0, 0]   A's tokens 4-5 (keys 0-5)
             [7, 0, 3, 5, 1]   B's tokens 0-2 (keys 0-7: history and the chunk)
    tables:  [[5, 2], [7, 1]]  (int32, padded with 0 to the widest)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from executor_svc.model.layers.paged_attention import attend_tile  # noqa: E402
from kernels._launch import Launcher  # noqa: E402

BLOCK_N = 64  # keys per loop iteration
# Query tokens per program and the loop's pipeline stages (num_stages), by the step's longest
# history: on the H100, 64 tokens without pipelining was the best of 36 configs over fresh
# prompts (16 x 128 tokens: 37 us a layer; 1 x 2,048: 192 us), 128 tokens with 3 stages over
# chunks with 1,536-6,144 tokens of history (10% faster there, 13-37% slower on fresh prompts;
# docs/benchmarks.md, tenth pass).
SHORT_HISTORY = (64, 1)
LONG_HISTORY = (128, 3)
LONG_HISTORY_TOKENS = 1024
_TILE_FIELDS = 5


@dataclass(slots=True)
class PrefillMeta:
    tiles: torch.Tensor  # [num_tiles, 5] int32: start, q_offset, length, history, table row
    tables: torch.Tensor  # [num_chunks, width] int32 block tables of the chunks' sequences
    block_m: int = SHORT_HISTORY[0]
    num_stages: int = SHORT_HISTORY[1]


def build_prefill_meta(
    chunks: list[tuple[int, int, int, list[int] | np.ndarray]],
    device: torch.device | str,
    block_m: int | None = None,
) -> PrefillMeta:
    """``chunks``: (start, length, history, block table) per prefill chunk of the step, the
    table covering history + length tokens. Built on the host, sent in one copy. ``block_m``
    overrides the query tile's size (and then the kernel runs 2 stages)."""
    if not chunks:
        raise ValueError("no prefill chunks")
    if block_m is None:
        long = max(h for _, _, h, _ in chunks) >= LONG_HISTORY_TOKENS
        block_m, stages = LONG_HISTORY if long else SHORT_HISTORY
    else:
        stages = 2
    width = max(len(t) for *_, t in chunks)
    num_tiles = sum(-(-n // block_m) for _, n, _, _ in chunks)
    # The tables start 16-byte aligned (after a whole number of 4-tile groups): Triton
    # specialises on a pointer's alignment, and a variant per alignment compiled while serving.
    tables_at = -(-num_tiles // 4) * 4 * _TILE_FIELDS
    buf = np.zeros(tables_at + len(chunks) * width, np.int32)
    tiles = buf[: num_tiles * _TILE_FIELDS].reshape(num_tiles, _TILE_FIELDS)
    tables = buf[tables_at:].reshape(len(chunks), width)
    i = 0
    for row, (start, n, history, table) in enumerate(chunks):
        if n < 1 or history < 0:
            raise ValueError(f"chunk {row}: length {n}, history {history}")
        tables[row, : len(table)] = table
        for off in range(0, n, block_m):
            tiles[i] = (start, off, n, history, row)
            i += 1
    dev = torch.from_numpy(buf).to(device, non_blocking=True)
    return PrefillMeta(
        tiles=dev[: num_tiles * _TILE_FIELDS].view(num_tiles, _TILE_FIELDS),
        tables=dev[tables_at:].view(len(chunks), width),
        block_m=block_m,
        num_stages=stages,
    )


@triton.jit(do_not_specialize=["stride_bt"])  # the tables' width: see _paged_decode_kernel
def _paged_prefill_kernel(
    Q,
    K,
    V,
    Out,
    tiles,
    block_tables,
    scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FIELDS: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    fields = tiles + tile * FIELDS  # start, q_offset, length, history, table row
    start = tl.load(fields)
    q_off = tl.load(fields + 1)
    length = tl.load(fields + 2)
    history = tl.load(fields + 3)
    table = block_tables + tl.load(fields + 4).to(tl.int64) * stride_bt
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)  # head_dim padded to a power of two; dmask keeps the real columns
    dmask = d < D
    qi = q_off + m
    qmask = qi < length
    tok = (start + qi).to(tl.int64)
    q = tl.load(
        Q + tok[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=qmask[:, None] & dmask[None, :],
        other=0.0,
    )
    qpos = history + qi
    # keys up to the tile's last query position (causal), no further
    kv_end = history + tl.minimum(q_off + BLOCK_M, length)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for k_start in range(0, kv_end, BLOCK_N):
        kpos = k_start + n
        kvalid = kpos < kv_end
        blk = tl.load(table + kpos // BLOCK_SIZE, mask=kvalid, other=0)
        rows = blk.to(tl.int64) * BLOCK_SIZE + kpos % BLOCK_SIZE
        kv_off = rows[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        # causal: key positions up to the query's own; key 0 is visible to every row
        visible = kvalid[None, :] & (kpos[None, :] <= qpos[:, None])
        m_i, l_i, acc = attend_tile(
            q, K + kv_off, V + kv_off, kvalid[:, None] & dmask[None, :], visible,
            m_i, l_i, acc, scale,
        )  # fmt: skip
    tl.store(
        Out + tok[:, None] * stride_ot + head * stride_oh + d[None, :],
        (acc / l_i[:, None]).to(Out.dtype.element_ty),
        mask=qmask[:, None] & dmask[None, :],
    )


_launch_paged_prefill = Launcher(_paged_prefill_kernel, unspecialized=("stride_bt",))


def paged_prefill_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PrefillMeta,
    scale: float,
    block_size: int,
    out: torch.Tensor,
    *,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """q, out: [T, Hq, D] (the step's tokens; the tiles name the prefill rows, the others are
    left as they are); k_cache, v_cache: [rows, Hkv, D] holding the chunks' own K/V already.
    Returns ``out``. ``block_n``, ``num_warps`` and ``num_stages`` (default: the metadata's) are
    there for the sweep in bench/attention_bench.py."""
    num_tiles = meta.tiles.shape[0]
    hq, d = q.shape[1], q.shape[2]
    if num_tiles == 0:
        return out
    _launch_paged_prefill(
        (num_tiles, hq),
        (
            q,
            k_cache,
            v_cache,
            out,
            meta.tiles,
            meta.tables,
            scale,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            meta.tables.stride(0),
            out.stride(0),
            out.stride(1),
        ),
        {
            "GROUP": hq // k_cache.shape[1],
            "D": d,
            "DP": max(16, triton.next_power_of_2(d)),
            "BLOCK_SIZE": block_size,
            "BLOCK_M": meta.block_m,
            "BLOCK_N": block_n,
            "FIELDS": _TILE_FIELDS,
        },
        {"num_warps": num_warps, "num_stages": num_stages or meta.num_stages},
    )
    return out
