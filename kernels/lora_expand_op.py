"""LoRA expand: y += w * scale * h @ B.T for every (token, adapter) pair, several slices.

One program per (tile, BLOCK_N columns, slice). For each adapter of the tile's plan it sums
the shrink's split-K partials, applies each row's mixture weight and the adapter's scale,
rounds to the weights' dtype (as PEFT does between lora_A and lora_B) and multiplies by the
adapter's B rows on the tensor cores (a plan of several adapters stacks them along the dot's
K dimension: one B load and one dot for all of them); the program then writes y once for all
of the tile's adapters, so y is read and written once per token in plan mode, without
atomics (column mode runs one launch per column; see kernels.metadata). Slices (fused qkv,
gate/up) are a grid axis: slice s writes y[:, off_s : off_s + out_s]. Launched as a
programmatic dependent of the shrink on Hopper: everything that does not depend on h (y, B,
weights, scales) is requested before ``griddepcontrol.wait``, so it overlaps the shrink; a
later column pass is a dependent of the pass before it in the same way (B requested early, y
after the wait). Column passes over a y larger than the GPU's ``expand_y_chunk_bytes`` run
chunk by chunk of y's columns (:func:`chunk_blocks`), so the later passes find y in the L2;
with two passes, the second over a chunk shares a launch with the first over the next chunk
(:func:`pass_launches`; a MIXED launch).

Based on: Punica (Chen et al. 2023) SGMV/BGMV expand, S-LoRA (Sheng et al. 2023), vLLM punica
ops. Ideas only; the code is ours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels._common import (
    INTERPRET,
    check_meta,
    check_operands,
    dot_precision,
    launch_options,
    next_pow2,
    pad3,
    pdl_supported,
    rank_chunk,
    slice_groups,
)
from kernels._launch import Launcher
from kernels._slices import slice_of_b
from kernels.config import expand_chunk_bytes, kernel_config
from kernels.metadata import LoraBatchMeta

# tile_offset (where a column-mode pass starts in the tile list) and h's strides change with
# the step, n_block_offset (where a chunk of y's columns starts) from launch to launch, and
# so do a mixed launch's second segment's (seg1_start, tile_offset1, n_block_offset1);
# specialised on their values (== 1, multiple of 16) they would compile new variants while
# serving.
_UNSPECIALIZED = (
    "tile_offset",
    "n_block_offset",
    "seg1_start",
    "tile_offset1",
    "n_block_offset1",
    "stride_hsp",
    "stride_hs",
)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _lora_expand_kernel(
    y_ptr,
    h_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    ranks_ptr,
    scales_ptr,
    row_tokens_ptr,
    row_weights_ptr,
    tile_start_ptr,
    tile_len_ptr,
    tile_col_ptr,
    tile_slots_ptr,
    tile_offset,
    n_block_offset,
    seg1_start,
    tile_offset1,
    n_block_offset1,
    out0,
    out1,
    out2,
    off0,
    off1,
    off2,
    sbs0,
    sbs1,
    sbs2,
    num_slots,
    stride_yt,
    stride_bn,
    stride_hsp,
    stride_hs,
    stride_ht,
    TILE_K: tl.constexpr,
    KP: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
    R_MAX: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_SLICES: tl.constexpr,
    EVEN_R: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    Y_EARLY: tl.constexpr,
    TRIGGER: tl.constexpr,
    STORE: tl.constexpr,
    MIXED: tl.constexpr,
):
    if TRIGGER:  # let the next column launch start its B loads (see pass_launches)
        gdc_launch_dependents()
    pid = tl.program_id(0)
    if MIXED:  # two passes in one launch (see pass_launches): the second pass over one chunk
        # of y's columns in programs [0, seg1_start), the first over the next chunk after
        first = pid >= seg1_start
        late = pid < seg1_start
        tile = tl.where(first, tile_offset1 + pid - seg1_start, tile_offset + pid)
        n0 = (tl.where(first, n_block_offset1, n_block_offset) + tl.program_id(1)) * BLOCK_N
        store = first if STORE else pid < 0  # the first pass stores, as in a launch of its own
    else:
        tile = tile_offset + pid
        n0 = (n_block_offset + tl.program_id(1)) * BLOCK_N
    s = tl.program_id(2)
    b_ptr, out_s, col_off, stride_bs = slice_of_b(
        s, b0_ptr, b1_ptr, b2_ptr, out0, out1, out2, off0, off1, off2, sbs0, sbs1, sbs2, N_SLICES
    )

    # Tiles are told apart from padding by their length, not by their ranks: the y and B
    # loads then wait for one round trip to memory, not two (the ranks arrive meanwhile).
    n_rows = tl.load(tile_len_ptr + tile)
    if (n_rows > 0) & (n0 < out_s):
        row0 = tl.load(tile_start_ptr + tile)
        offs_m = tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_rows
        tok = tl.load(row_tokens_ptr + row0 + offs_m, mask=row_ok, other=0).to(tl.int64)
        col0 = tl.load(tile_col_ptr + tile)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < out_s
        h_rows = h_ptr + s * stride_hs + tok[:, None] * stride_ht + col0 * R_MAX
        # y and B do not depend on the shrink: with programmatic dependent launch (PDL) they
        # are requested before waiting for the shrink's grid, so their latency overlaps it.
        # A later column pass reads y after its wait (the previous pass writes y), B before.
        y_tile = y_ptr + tok[:, None] * stride_yt + (col_off + offs_n)[None, :]
        y_mask = row_ok[:, None] & n_ok[None, :]
        if MIXED:  # the first pass's programs request y here, the later pass's after the wait
            if STORE:  # (the first pass does not read y)
                y_early_old = tl.zeros([BLOCK_M, BLOCK_N], dtype=y_ptr.dtype.element_ty)
            else:
                y_early_old = tl.load(y_tile, mask=y_mask & first, other=0.0)
        elif (not STORE) and Y_EARLY:
            y_old = tl.load(y_tile, mask=y_mask, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if TILE_K == 1:  # one adapter: B's rows from one scalar base (contiguous along r,
            # 16-byte loads). The first rank chunk is loaded once the slot is known; later
            # ones once its rank is. (The stacked code below took 70 registers here instead of
            # 60: 3 programs of 8 warps an SM instead of 4, and 64 adapters at 64 tokens no
            # longer ran in one wave; docs/benchmarks.md, fifteenth pass.)
            slot = tl.load(tile_slots_ptr + tile)
            rank = tl.load(ranks_ptr + s * num_slots + slot, mask=slot >= 0, other=0)
            rank = tl.minimum(rank, R_MAX)
            max_rank = tl.maximum(rank, 0)
            b_rows = b_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bs
            w = tl.load(row_weights_ptr + row0 + offs_m, mask=row_ok)
            scale = tl.load(scales_ptr + s * num_slots + tl.maximum(slot, 0))
            acc = _expand_one(
                acc, 0, slot >= 0, rank, row_ok, n_ok, offs_n, b_rows, h_rows, w * scale,
                stride_bn, stride_hsp, RANK_CHUNK, R_MAX, NUM_SPLITS, SPLIT_GROUP, BLOCK_M,
                EVEN_R, UPCAST, DOT_PRECISION, USE_PDL,
            )  # fmt: skip
            for r0 in range(RANK_CHUNK, rank, RANK_CHUNK):
                acc = _expand_one(
                    acc, r0, slot >= 0, rank, row_ok, n_ok, offs_n, b_rows, h_rows, w * scale,
                    stride_bn, stride_hsp, RANK_CHUNK, R_MAX, NUM_SPLITS, SPLIT_GROUP, BLOCK_M,
                    EVEN_R, UPCAST, DOT_PRECISION, USE_PDL,
                )  # fmt: skip
        else:
            # The tile's adapters are stacked along the dot's K dimension, columns j ->
            # (adapter kj, rank row rj), as in the shrink: one load of all their B rows and
            # one dot, so that every adapter's B is requested before the wait. (One dot per
            # adapter put the next adapter's slot, B and h loads after the previous one's wait
            # and dot: two or three more round trips to memory once the shrink had ended.)
            # Each column's values are built from the adapters' scalars with selects, not
            # gathered, so that the compiler sees B's rows contiguous along r in runs of
            # RANK_CHUNK (16-byte loads); a 3-d [adapter, r, n] tile did that too, but its
            # layout repeated B across warps.
            offs_j = tl.arange(0, KP * RANK_CHUNK)
            kj = offs_j // RANK_CHUNK
            rj = offs_j % RANK_CHUNK
            b_off = tl.zeros([KP * RANK_CHUNK], dtype=tl.int64)
            rank_j = tl.zeros([KP * RANK_CHUNK], dtype=tl.int32)
            row_scale = tl.zeros([BLOCK_M, KP * RANK_CHUNK], dtype=tl.float32)
            used_j = kj < 0
            for k in tl.static_range(TILE_K):
                slot = tl.load(tile_slots_ptr + tile * TILE_K + k)
                rank = tl.load(ranks_ptr + s * num_slots + slot, mask=slot >= 0, other=0)
                scale = tl.load(scales_ptr + s * num_slots + tl.maximum(slot, 0))
                w = tl.load(row_weights_ptr + (row0 + offs_m) * TILE_K + k, mask=row_ok)
                mine = kj == k
                b_off = tl.where(mine, tl.maximum(slot, 0).to(tl.int64) * stride_bs, b_off)
                rank_j = tl.where(mine, tl.minimum(rank, R_MAX), rank_j)
                row_scale = tl.where(mine[None, :], (w * scale)[:, None], row_scale)
                used_j = used_j | (mine & (slot >= 0))  # nothing is loaded for empty columns
            max_rank = tl.max(rank_j, axis=0)
            b_rows = b_ptr + b_off[:, None]  # + rank row
            h_cols = h_rows + kj[None, :] * R_MAX  # + rank row
            # The first rank chunk is loaded once the slots are known, later ones once the ranks
            # are.
            acc = _expand_stacked(
                acc, 0, used_j, rank_j, rj, row_ok, n_ok, offs_n, b_rows, h_cols, row_scale,
                stride_bn, stride_hsp, R_MAX, NUM_SPLITS, SPLIT_GROUP, BLOCK_M, EVEN_R, UPCAST,
                DOT_PRECISION, USE_PDL,
            )  # fmt: skip
            # (compiled only where a rank can pass one chunk: the compiler cannot bound a max
            # of loaded ranks, and the dead loop kept B's and h's pointers live through the
            # wait, 186 registers against 72 at K=2, r_max 16)
            for r0 in range(RANK_CHUNK, max_rank if R_MAX > RANK_CHUNK else 0, RANK_CHUNK):
                acc = _expand_stacked(
                    acc, r0, used_j, rank_j, rj, row_ok, n_ok, offs_n, b_rows, h_cols, row_scale,
                    stride_bn, stride_hsp, R_MAX, NUM_SPLITS, SPLIT_GROUP, BLOCK_M, EVEN_R, UPCAST,
                    DOT_PRECISION, USE_PDL,
                )  # fmt: skip
        # The delta is rounded to y's dtype before it is added, as PEFT adds its lora_B output;
        # a delta kept in a buffer of its own (kernels.linear_beside_lora) then sums the same.
        delta = acc.to(y_ptr.dtype.element_ty)
        if MIXED:
            # (the early y as the masked load's other value: one tile of registers, not two)
            y_old = tl.load(y_tile, mask=y_mask & late, other=y_early_old).to(tl.float32)
            y_new = tl.where(store, delta.to(tl.float32), y_old + delta.to(tl.float32))
            y_mask = y_mask & ((max_rank > 0) | store)
            tl.store(y_tile, y_new.to(y_ptr.dtype.element_ty), mask=y_mask)
        elif STORE:  # y's rows are the delta (zeros for adapters without this module)
            tl.store(y_tile, delta, mask=y_mask)
        else:
            if not Y_EARLY:  # after the first chunk's wait: the previous pass's y
                y_old = tl.load(y_tile, mask=y_mask, other=0.0)
            # A tile whose adapters all have rank 0 here (adapters without this module) leaves
            # y untouched, bit for bit.
            y_mask = y_mask & (max_rank > 0)
            y_new = y_old.to(tl.float32) + delta.to(tl.float32)
            tl.store(y_tile, y_new.to(y_ptr.dtype.element_ty), mask=y_mask)
    if USE_PDL:  # idle programs too: this grid never completes before the shrink's
        gdc_wait()


@triton.jit
def _expand_stacked(
    acc, r0, used_j, rank_j, rj, row_ok, n_ok, offs_n, b_rows, h_cols, row_scale, stride_bn,
    stride_hsp, R_MAX: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLIT_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, EVEN_R: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """acc + (h rows r0 + rj of every stacked column j, summed over the K splits and scaled
    per row and column) @ (the matching B rows), one dot for all the tile's adapters; B rows
    and h columns at or above their adapter's rank count as zero (B's may hold a previous
    adapter's weights; h's past the shrink's chunks are unwritten)."""
    r = r0 + rj
    live = r < rank_j
    col_ok = used_j if EVEN_R else used_j & (r < R_MAX)  # EVEN_R: no chunk crosses r_max
    bt = tl.load(
        b_rows + offs_n[None, :] * stride_bn + r[:, None],
        mask=col_ok[:, None] & n_ok[None, :],
        other=0.0,
    )
    bt = tl.where(live[:, None], bt, tl.zeros_like(bt))
    if USE_PDL:
        gdc_wait()  # the shrink's h is complete and visible past this point
    hm = row_ok[:, None] & col_ok[None, :]
    h_cols = h_cols + r[None, :]
    hs = _sum_splits(h_cols, hm, stride_hsp, BLOCK_M, r.shape[0], NUM_SPLITS, SPLIT_GROUP, True)
    hs = tl.where(live[None, :], hs * row_scale, 0.0)
    return _dot_add(acc, hs, bt, UPCAST, DOT_PRECISION)


@triton.jit
def _expand_one(
    acc, r0, used, rank, row_ok, n_ok, offs_n, b_rows, h_rows, row_scale,
    stride_bn, stride_hsp,
    RANK_CHUNK: tl.constexpr, R_MAX: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLIT_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_R: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """acc + (h rows r0 .. r0 + RANK_CHUNK - 1 of a tile's one adapter, summed over the K
    splits and scaled per row) @ (B rows r0 ...); B rows and h columns at or above ``rank``
    count as zero (B's may hold a previous adapter's weights; h's past the shrink's chunks are
    unwritten)."""
    offs_r = tl.arange(0, RANK_CHUNK)
    r = r0 + offs_r
    live = r < rank
    # Nothing is loaded for an empty adapter column (slot -1: a K=4 graph running K=2 plans).
    if EVEN_R:  # no chunk crosses r_max
        hm = row_ok[:, None] & used
        bm = n_ok[None, :] & used
    else:
        hm = row_ok[:, None] & (r < R_MAX)[None, :] & used
        bm = n_ok[None, :] & (r < R_MAX)[:, None] & used
    bt = tl.load(b_rows + offs_n[None, :] * stride_bn + r[:, None], mask=bm, other=0.0)
    bt = tl.where(live[:, None], bt, tl.zeros_like(bt))
    if USE_PDL:
        gdc_wait()  # the shrink's h is complete and visible past this point
    hs = _sum_splits(h_rows + r[None, :], hm, stride_hsp, BLOCK_M, RANK_CHUNK, NUM_SPLITS,
                     SPLIT_GROUP, False)  # fmt: skip
    hs = tl.where(live[None, :], hs * row_scale[:, None], 0.0)
    return _dot_add(acc, hs, bt, UPCAST, DOT_PRECISION)


@triton.jit
def _sum_splits(
    h_cols, hm, stride_hsp, BLOCK_M: tl.constexpr, COLS: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_GROUP: tl.constexpr, TWO_SUMS: tl.constexpr,
):  # fmt: skip
    """The shrink's split-K partials of h at ``h_cols`` ([BLOCK_M, COLS] pointers into split
    0), summed; masked-off entries are 0."""
    hs = tl.zeros([BLOCK_M, COLS], dtype=tl.float32)
    if SPLIT_GROUP == NUM_SPLITS and TWO_SUMS and NUM_SPLITS >= 16:  # every partial requested
        # at once, into two sums: with one, ptxas kept 13 of a stacked K=2 tile's 64 partial
        # loads in flight (1.5 us more than the per-adapter expand at one token); with two,
        # 108 (sm_90 SASS compiled on the CPU host). The one-adapter expand keeps one sum:
        # two took it from 60 to 66 registers.
        hs1 = tl.zeros([BLOCK_M, COLS], dtype=tl.float32)
        for sp in tl.static_range(0, NUM_SPLITS, 2):
            hs += tl.load(h_cols + sp * stride_hsp, mask=hm, other=0.0)
            if sp + 1 < NUM_SPLITS:
                hs1 += tl.load(h_cols + (sp + 1) * stride_hsp, mask=hm, other=0.0)
        hs += hs1
    elif SPLIT_GROUP == NUM_SPLITS:  # every partial requested at once, one sum
        for sp in tl.static_range(NUM_SPLITS):
            hs += tl.load(h_cols + sp * stride_hsp, mask=hm, other=0.0)
    else:  # SPLIT_GROUP partials at a time: all at once would not fit in registers
        for sp0 in range(0, NUM_SPLITS, SPLIT_GROUP):
            for sp in tl.static_range(SPLIT_GROUP):
                sp_ok = sp0 + sp < NUM_SPLITS
                hs += tl.load(h_cols + (sp0 + sp) * stride_hsp, mask=hm & sp_ok, other=0.0)
    return hs


@triton.jit
def _dot_add(acc, hs, bt, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + hs @ bt on the tensor cores, hs rounded to B's dtype (as PEFT rounds lora_A's
    output before lora_B)."""
    if UPCAST:  # the interpreter mishandles bf16 arithmetic
        return acc + tl.dot(hs, bt.to(tl.float32), input_precision=DOT_PRECISION)
    return acc + tl.dot(hs.to(bt.dtype), bt, input_precision=DOT_PRECISION)


_launch_expand = Launcher(_lora_expand_kernel, unspecialized=_UNSPECIALIZED)


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
    *,
    config: dict | None = None,
    pdl: bool | None = None,
    store: bool = False,
) -> None:
    """Up-project, weight, scale and add into y, in place, for every slice.

    Semantics:
        for s in range(n_slices):
            for t in range(num_tokens):
                if store and token_slots[t, 0] >= 0:
                    y[t, off_s:off_s + out_s] = 0     # (never read: stored, not added)
                for k in range(max_k):
                    slot = token_slots[t, k]
                    if slot >= 0:
                        r = ranks[s, slot]
                        y[t, off_s:off_s + out_s] += (token_weights[t, k] * scales[s, slot]
                                                      * h.sum(0)[s, t, k, :r] @ B[s][slot, :, :r].T)

    Args:
        y: [T, sum(out_s)] fp32/fp16/bf16, last dimension contiguous; updated in place.
        h: [num_splits, n_slices, T, max_k, r_max] float32, from :func:`lora_shrink`.
        lora_b: one [slots, out_s, r_max] tensor per slice, y's dtype, same slots and r_max,
            contiguous along r.
        ranks: [n_slices, slots] int32 (must be <= r_max).
        scales: [n_slices, slots] float32.
        meta: the step's :class:`LoraBatchMeta`.
        config: launch parameters overriding the tuned ones (BLOCK_N, num_warps, num_stages;
            Y_CHUNK_BYTES, column mode's chunk of y, see :func:`chunk_blocks`).
        pdl: launch as a programmatic dependent of the previous kernel (the shrink), so that
            y and B are fetched while the shrink finishes; default: on Hopper and newer.
        store: the rows of tokens with adapters are overwritten with their delta (y is not
            read: a fresh delta buffer needs no zero fill, see :func:`zero_rows_without_lora`);
            rows of base-only tokens are left as they are.
    """
    pdl = pdl_supported(y.device) if pdl is None else pdl and pdl_supported(y.device)
    key = None
    if config is None:  # a plan per operand layout, kept on the step's meta
        key = ("expand", y.shape, y.stride(), y.dtype, y.device, h.shape, h.stride(),
               ranks.shape, ranks.stride(), ranks.dtype, scales.shape, scales.stride(),
               scales.dtype, pdl, store,
               *((b.shape, b.stride(), b.dtype, b.device) for b in lora_b))  # fmt: skip
        plan = meta.plans.get(key)
    if key is None or plan is None:
        plan = _plan(y, h, lora_b, ranks, scales, meta, config, pdl, store)
        if key is not None:
            meta.plans[key] = plan
    for g0, g1, ints, passes in plan:
        b = pad3(lora_b[g0:g1], lora_b[g0])
        # views only past the first group: a view costs ~5 us of host time per call
        h_g, ranks_g, scales_g = (
            (h, ranks, scales) if g0 == 0 else (h[:, g0:], ranks[g0:], scales[g0:])
        )
        # A launch per pass and chunk, or two passes' segments (pass_launches): a token appears
        # at most once in a pass (see kernels.metadata), so no atomics.
        for grid, segments, constexprs, options in passes:
            args = (y, h_g, b[0], b[1], b[2], ranks_g, scales_g, meta.row_tokens,
                    meta.row_weights, meta.tile_start, meta.tile_len, meta.tile_col,
                    meta.tile_slots, *segments, *ints)  # fmt: skip
            _launch_expand(grid, args, constexprs, options)


def _plan(y, h, lora_b, ranks, scales, meta: LoraBatchMeta, config, pdl: bool, store: bool):
    """Validate the operands and work out the launches: per slice group (g0, g1, the int
    arguments after the segments', [(grid, the segments' ints, constexprs, options) per
    launch])."""
    check_meta(meta, y.device, "lora_expand")
    check_operands(y, lora_b, ranks, "lora_expand")
    n_slices, slots, r_max = len(lora_b), lora_b[0].shape[0], lora_b[0].shape[2]
    outs = [b.shape[1] for b in lora_b]
    if y.dim() != 2 or y.shape[1] != sum(outs) or y.stride(1) != 1:
        raise ValueError(f"lora_expand: y must be [T, {sum(outs)}] with contiguous rows")
    if any(
        b.shape[0] != slots or b.shape[2] != r_max or b.stride(1) != lora_b[0].stride(1)
        for b in lora_b
    ):
        raise ValueError("lora_expand: B slices must share slots, r_max and the n stride")
    if h.shape[1:] != (n_slices, y.shape[0], meta.max_k, r_max) or not h.is_contiguous():
        raise ValueError(
            f"lora_expand: h has shape {tuple(h.shape)}, expected "
            f"[splits, {n_slices}, {y.shape[0]}, {meta.max_k}, {r_max}]"
        )
    if scales.shape != ranks.shape or not scales.is_contiguous():
        raise ValueError("lora_expand: scales must be a contiguous [n_slices, slots] tensor")
    if meta.num_active == 0 or meta.grid_tiles == 0:
        return []
    # (expand entries with min_work apply to tiles of at least that many adapters)
    cfg = config or kernel_config("expand", y.shape[0], max(outs), y.device, work=meta.tile_k)
    block_n = min(cfg["BLOCK_N"], max(16, next_pow2(max(outs))))
    chunk_bytes = expand_chunk_bytes(y.device)
    kp, chunk_r = rank_chunk(r_max, meta.tile_k)  # the shrink's chunks, which wrote h
    splits = h.shape[0]
    group = split_group(splits, kp, meta.block_m, chunk_r, cfg["num_warps"])
    offs = [sum(outs[:i]) for i in range(n_slices)]
    groups = []
    for g0, g1 in slice_groups(n_slices):
        o, f = pad3(outs[g0:g1], 0), pad3(offs[g0:g1], 0)
        sbs = pad3([x.stride(0) for x in lora_b[g0:g1]], 0)
        ints = (*o, *f, *sbs, slots, y.stride(0), lora_b[0].stride(1), *h.stride()[:3])
        n_blocks = triton.cdiv(max(outs[g0:g1]), block_n)
        live = [n for n in meta.pass_tiles if n]
        budget = cfg.get("Y_CHUNK_BYTES", chunk_bytes)
        if staggers(len(live)):  # two chunks in the L2 at once: each gets half (pass_launches)
            budget //= 2
        chunk = chunk_blocks(n_blocks, y.shape[0] * sum(outs[g0:g1]) * y.element_size(),
                             len(live), budget)  # fmt: skip
        # Every launch is a programmatic dependent of the kernel before it (the shrink, then
        # the previous pass), which lets it start as soon as that kernel's programs all run:
        # B is requested before the wait; y before it in a chunk's first pass only, since each
        # later pass adds to what the previous one wrote. Column passes go chunk by chunk of
        # y's columns (see chunk_blocks and pass_launches).
        offsets = [sum(live[:i]) for i in range(len(live))]
        passes = []
        launches = pass_launches(len(live), list(range(0, n_blocks, chunk)))
        for j, segments in enumerate(launches):
            (i, nb0), mixed = segments[0], len(segments) > 1
            i1, nb1 = segments[-1]
            constexprs = dict(
                TILE_K=meta.tile_k,
                KP=kp,
                RANK_CHUNK=chunk_r,
                R_MAX=r_max,
                NUM_SPLITS=splits,
                SPLIT_GROUP=group,
                BLOCK_M=meta.block_m,
                BLOCK_N=block_n,
                N_SLICES=g1 - g0,
                EVEN_R=r_max % chunk_r == 0,
                UPCAST=INTERPRET,
                DOT_PRECISION=dot_precision(y.dtype),
                USE_PDL=pdl,
                Y_EARLY=i == 0,
                TRIGGER=pdl and j + 1 < len(launches),
                # the first pass holds every token with an adapter (column 0 of each), once
                STORE=store and i1 == 0,
                MIXED=mixed,
            )
            options = launch_options(y.device, cfg, dependent=pdl)
            tiles = live[i] + (live[i1] if mixed else 0)
            grid = (tiles, min(chunk, n_blocks - nb0), g1 - g0)  # (nb0 < nb1 when mixed)
            passes.append((grid, (offsets[i], nb0, live[i], offsets[i1], nb1), constexprs, options))
        groups.append((g0, g1, ints, passes))
    return groups


def pass_launches(n_passes: int, chunk_starts: list[int]) -> list[list[tuple[int, int]]]:
    """The column passes' launches, in order: each a list of (pass, first block of its chunk)
    segments, one or two.

    Every pass runs over a chunk after the pass before it over the same chunk, in an earlier
    launch (each launch waits for the one before it). With one chunk, or more than two passes,
    a launch is one pass over one chunk: every pass over a chunk, then the next chunk. With
    two passes over several chunks, the second pass over chunk c shares a launch with the
    first pass over chunk c + 1 (their columns are disjoint), so the one runs beside the
    other instead of after it. lora_expand then gives each chunk half the byte budget (two
    are in the L2 at once), which makes about as many launches as one pass a launch over
    chunks of the whole budget; on the H100 the wavefront took K=2 at 11008 out, 4,096
    tokens from 156 to 149 us (docs/benchmarks.md, twentieth pass).

    Example: 2 passes, chunks starting at blocks 0, 9, 18:
    [[(0, 0)], [(1, 0), (0, 9)], [(1, 9), (0, 18)], [(1, 18)]]"""
    if not staggers(n_passes) or len(chunk_starts) < 2:
        return [[(i, nb0)] for nb0 in chunk_starts for i in range(n_passes)]
    c = chunk_starts
    return [[(0, c[0])], *([(1, c[j - 1]), (0, c[j])] for j in range(1, len(c))), [(1, c[-1])]]


def staggers(n_passes: int) -> bool:
    """Whether column passes over several chunks share launches (see pass_launches)."""
    return n_passes == 2 and os.environ.get("LORASERVE_KERNELS_STAGGER") != "0"


def chunk_blocks(n_blocks: int, y_bytes: int, passes: int, chunk_bytes: int) -> int:
    """Column blocks per launch of a column-mode pass: all ``n_blocks`` for one pass, for
    ``chunk_bytes`` 0 or for a y (``y_bytes`` over all its columns) within one chunk; else
    the blocks split evenly into the fewest chunks of about ``chunk_bytes`` each.

    A later pass over a chunk runs right after the pass before it over that chunk (beside
    the next chunk's first pass with two passes, see pass_launches), so it finds the chunk of
    y that pass wrote still in the L2 (and its B columns with it), instead of reading y from
    memory again. Measured on the H100 (docs/benchmarks.md, eighteenth pass): K=2 over 64
    adapters, 11008 out, 4,096 tokens, 179 -> 156 us."""
    if passes < 2 or chunk_bytes <= 0 or y_bytes <= chunk_bytes:
        return n_blocks
    chunks = min(n_blocks, triton.cdiv(y_bytes, chunk_bytes))
    return triton.cdiv(n_blocks, chunks)


# Registers a thread may spend on the h partials it has requested at once (the expand sums
# the shrink's split-K partials). Far past it the compiled kernel spilled without bound: at
# 1,024 tokens, K=2, 64 splits and 32-row tiles (512 registers' worth), ptxas gave it 7 KB of
# stack a thread and the launch failed with an illegal memory access on the H100; in groups
# of 16 it needs 488 bytes and runs (docs/benchmarks.md, fourteenth pass). The tuned configs
# stay at or under it (decode: 32 splits, K=2 or 4, 128), so they load every partial at once:
# a budget of 64 split K=2 decode tiles into two rounds and cost them 1.5-2 us.
_H_REGS = 128


def split_group(num_splits: int, kp: int, block_m: int, chunk: int, num_warps: int) -> int:
    """How many split-K partials of h the expand loads at once: all of them when their
    registers (kp stacked adapters x block_m x chunk fp32 values over the threads) fit in
    ``_H_REGS`` a thread, else the largest power of two that fits (at least 1)."""
    per_split = kp * block_m * chunk // (32 * num_warps)
    if num_splits * per_split <= _H_REGS:
        return num_splits
    return 1 << max(0, (_H_REGS // max(1, per_split)).bit_length() - 1)


@triton.jit
def _zero_rows_kernel(y_ptr, slots_ptr, stride_yt, stride_st, n, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    # a token's slots are sorted with -1 last: column 0 is -1 only for a token with no adapter
    if tl.load(slots_ptr + t * stride_st) < 0:
        offs = tl.arange(0, BLOCK_N)
        zeros = tl.zeros([BLOCK_N], dtype=y_ptr.dtype.element_ty)
        for n0 in range(0, n, BLOCK_N):
            tl.store(y_ptr + t * stride_yt + n0 + offs, zeros, mask=n0 + offs < n)


_launch_zero_rows = Launcher(_zero_rows_kernel)


def zero_rows_without_lora(y: torch.Tensor, meta: LoraBatchMeta) -> None:
    """Zero the rows of y whose tokens have no adapter, in place (one launch, a program per
    row; rows of tokens with adapters are not touched).

    Semantics:
        for t in range(num_tokens):
            if token_slots[t, 0] < 0:
                y[t, :] = 0

    With :func:`lora_expand`'s ``store`` mode this defines a fresh delta buffer everywhere
    while writing each of its bytes once: a fill of the whole buffer and the expand's read of
    it moved 4 bytes of bf16 per element more (docs/benchmarks.md, twelfth pass).
    """
    check_meta(meta, y.device, "zero_rows_without_lora")
    if y.dim() != 2 or y.shape[0] != meta.num_tokens or y.stride(1) != 1:
        raise ValueError(
            f"zero_rows_without_lora: y must be [{meta.num_tokens}, n] with contiguous rows"
        )
    if y.shape[0]:
        _launch_zero_rows(
            (y.shape[0],),
            (y, meta.token_slots, y.stride(0), meta.token_slots.stride(0), y.shape[1]),
            {"BLOCK_N": 1024},
            {"num_warps": 4},
        )
