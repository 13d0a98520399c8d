"""LoRA shrink: h = x @ A.T for every (token, adapter) pair of a heterogeneous batch.

One program per (tile, K split, slice). A tile is a run of tokens sharing one plan (see
:mod:`kernels.metadata`), so the program gathers the tile's x rows once per K block and
multiplies them on the tensor cores by the *stacked* A rows of all the plan's adapters
(columns ``k * RANK_CHUNK + r``): K adapters per token cost one pass over x. Rank chunks run up
to the largest rank of the plan, so slots of a lower rank than ``r_max`` cost no padded chunks;
past the first chunk (loaded before the ranks arrive; its columns above a rank are never read)
rows above an adapter's rank are not loaded. The K dimension is split across programs
(split-K, as in Punica's BGMV shrink) so that decode batches of a few tokens still spread
over the whole GPU; the partial sums are added by the expand, not with atomics, which keeps
the result deterministic and needs no zeroed buffer. The expand reads every split back, so a
launch with many tiles (many adapters, or K > 1) takes fewer splits: the tuned configs carry
``min_work`` entries for that (kernels.config).

Based on: Punica (Chen et al. 2023) SGMV/BGMV, S-LoRA (Sheng et al. 2023), vLLM punica ops.
Ideas only; the code is ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from kernels._common import (
    INTERPRET,
    SLICES_PER_LAUNCH,
    cdiv,
    check_meta,
    check_operands,
    dot_precision,
    fit_stages,
    launch_options,
    next_pow2,
    pad3,
    pdl_supported,
    rank_chunk,
    shared_memory_limit,
    slice_groups,
)
from kernels._launch import Launcher
from kernels._slices import slice_of_a
from kernels.config import kernel_config
from kernels.metadata import LoraBatchMeta


# h's strides move with T: specialised on their values (multiple of 16 or not) they would
# compile new variants while serving.
@triton.jit(do_not_specialize=["stride_hsp", "stride_hs"])
def _lora_shrink_kernel(
    x_ptr,
    h_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    ranks_ptr,
    row_tokens_ptr,
    tile_start_ptr,
    tile_len_ptr,
    tile_col_ptr,
    tile_slots_ptr,
    in_features,
    k_per_split,
    num_slots,
    stride_xt,
    stride_as,
    stride_ar,
    stride_hsp,
    stride_hs,
    stride_ht,
    TILE_K: tl.constexpr,
    KP: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
    R_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    N_SLICES: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_R: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # let the expand start its independent loads (see lora_expand_op)
        gdc_launch_dependents()
    tile = tl.program_id(0)
    split = tl.program_id(1)
    s = tl.program_id(2)
    a_ptr, _ = slice_of_a(s, a0_ptr, a1_ptr, a2_ptr, stride_as, stride_as, stride_as, N_SLICES)

    # The tile's plan, stacked as columns j -> (adapter kj, rank row r0 + rj).
    offs_j = tl.arange(0, KP * RANK_CHUNK)
    kj = offs_j // RANK_CHUNK
    rj = offs_j % RANK_CHUNK
    slot_j = tl.load(tile_slots_ptr + tile * TILE_K + kj, mask=kj < TILE_K, other=-1)
    rank_j = tl.load(ranks_ptr + s * num_slots + slot_j, mask=slot_j >= 0, other=0)
    rank_j = tl.minimum(rank_j, R_MAX)
    max_rank = tl.max(rank_j, axis=0)  # 0 for padding tiles: nothing runs

    n_rows = tl.load(tile_len_ptr + tile)
    row0 = tl.load(tile_start_ptr + tile)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    tok = tl.load(row_tokens_ptr + row0 + offs_m, mask=row_ok, other=0).to(tl.int64)
    col0 = tl.load(tile_col_ptr + tile)  # the tile fills h columns col0 .. col0 + TILE_K - 1
    x_rows = x_ptr + tok[:, None] * stride_xt
    a_rows = a_ptr + tl.maximum(slot_j, 0).to(tl.int64) * stride_as
    k_lo = split * k_per_split
    h_base = h_ptr + split * stride_hsp + s * stride_hs + tok[:, None] * stride_ht + col0 * R_MAX

    # The first rank chunk is loaded as soon as the slots are known, not after their ranks
    # (a second dependent round trip to memory at the head of every program): its rows at or
    # above a rank are loaded too, and their columns of h are never read. Later chunks mask
    # their loads.
    if n_rows > 0:  # (for a tile whose ranks are all 0 here the expand stores nothing)
        _shrink_chunk(
            0, (slot_j >= 0) & (rj < R_MAX), rank_j, kj, rj, row_ok, x_rows, a_rows, h_base,
            k_lo, k_per_split, in_features, stride_ar, TILE_K, KP, RANK_CHUNK, R_MAX, BLOCK_M,
            BLOCK_K, EVEN_K, EVEN_R, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    for r0 in range(RANK_CHUNK, max_rank, RANK_CHUNK):
        _shrink_chunk(
            r0, r0 + rj < rank_j, rank_j, kj, rj, row_ok, x_rows, a_rows, h_base,
            k_lo, k_per_split, in_features, stride_ar, TILE_K, KP, RANK_CHUNK, R_MAX, BLOCK_M,
            BLOCK_K, EVEN_K, EVEN_R, UPCAST, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _shrink_chunk(
    r0, col_ok, rank_j, kj, rj, row_ok, x_rows, a_rows, h_base,
    k_lo, k_per_split, in_features, stride_ar,
    TILE_K: tl.constexpr, KP: tl.constexpr, RANK_CHUNK: tl.constexpr, R_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_R: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """h columns of rank rows r0 .. r0 + RANK_CHUNK - 1 (A rows loaded where ``col_ok``) over
    this program's K split. Columns at or above an adapter's rank are left as they come (the
    first chunk's from whatever its A rows hold): every reader masks them by rank."""
    r = r0 + rj
    a_cols = a_rows[None, :] + r[None, :] * stride_ar
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, KP * RANK_CHUNK], dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        k = k_lo + kk + offs_k
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], mask=row_ok[:, None], other=0.0)
            at = tl.load(a_cols + k[:, None], mask=col_ok[None, :], other=0.0)
        else:
            k_ok = k < in_features
            xt = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_cols + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter mishandles bf16 arithmetic
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision=DOT_PRECISION)
    if EVEN_R:  # no chunk crosses r_max
        h_mask = row_ok[:, None] & (kj < TILE_K)[None, :]
    else:
        h_mask = row_ok[:, None] & ((kj < TILE_K) & (r < R_MAX))[None, :]
    tl.store(h_base + kj[None, :] * R_MAX + r[None, :], acc, mask=h_mask)


_launch_shrink = Launcher(_lora_shrink_kernel, unspecialized=("stride_hsp", "stride_hs"))


def lora_shrink(
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    meta: LoraBatchMeta,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Down-project every (token, adapter) pair; returns split-K partial sums.

    Semantics:
        for s in range(n_slices):
            for t in range(num_tokens):
                for k in range(max_k):
                    slot = token_slots[t, k]
                    if slot >= 0:
                        r = ranks[s, slot]
                        h.sum(0)[s, t, k, :r] = x[t] @ A[s][slot, :r].T

    Args:
        x: [T, in] fp32/fp16/bf16, last dimension contiguous.
        lora_a: one [slots, r_max, in] tensor per slice; all of the same shape, x's dtype.
        ranks: [n_slices, slots] int32 (0 = empty slot; must be <= r_max).
        meta: the step's :class:`LoraBatchMeta` (on x's device).
        config: launch parameters overriding the tuned ones (BLOCK_K, SPLIT_K, num_warps,
            num_stages).

    Returns:
        [num_splits, n_slices, T, max_k, r_max] float32 partial sums over ``in``; entries of
        base-only tokens, empty (token, k) pairs and rows r >= rank are unspecified.
    """
    pdl = pdl_supported(x.device)
    key = None
    if config is None:  # a plan per operand layout, kept on the step's meta
        key = ("shrink", x.shape, x.stride(), x.dtype, x.device, ranks.shape, ranks.stride(),
               ranks.dtype, pdl, *((a.shape, a.stride(), a.dtype, a.device) for a in lora_a))  # fmt: skip
        plan = meta.plans.get(key)
    if key is None or plan is None:
        plan = _plan(x, lora_a, ranks, meta, config, pdl)
        if key is not None:
            meta.plans[key] = plan
    h_shape, launches, ints = plan
    h = torch.empty(h_shape, dtype=torch.float32, device=x.device)
    a0 = lora_a[0]
    for g0, g1, grid, constexprs, options in launches:
        a = pad3(lora_a[g0:g1], a0)
        # views only past the first group: a view costs ~5 us of host time per call
        h_g, ranks_g = (h, ranks) if g0 == 0 else (h[:, g0:], ranks[g0:])
        args = (x, h_g, a[0], a[1], a[2], ranks_g, meta.row_tokens, meta.tile_start,
                meta.tile_len, meta.tile_col, meta.tile_slots, *ints)  # fmt: skip
        _launch_shrink(grid, args, constexprs, options)
    return h


def _plan(x, lora_a, ranks, meta: LoraBatchMeta, config: dict | None, pdl: bool) -> tuple:
    """Validate the operands and work out the launches: (h's shape, [(g0, g1, grid,
    constexprs, options)], the int arguments)."""
    check_meta(meta, x.device, "lora_shrink")
    check_operands(x, lora_a, ranks, "lora_shrink")
    n_slices, (slots, r_max, in_features) = len(lora_a), lora_a[0].shape
    t = x.shape[0]
    if x.dim() != 2 or x.shape[1] != in_features or x.stride(1) != 1:
        raise ValueError(f"lora_shrink: x must be [T, {in_features}] with contiguous rows")
    if any(a.shape != lora_a[0].shape or a.stride() != lora_a[0].stride() for a in lora_a):
        raise ValueError("lora_shrink: all A slices must share shape and strides")
    # (tile, adapter, slice) units one launch covers: with many, fewer K splits do better
    work = meta.grid_tiles * meta.tile_k * min(n_slices, SLICES_PER_LAUNCH)
    cfg = config or kernel_config("shrink", t, in_features, x.device, work=work, mode=meta.mode)
    block_k = min(cfg["BLOCK_K"], max(16, next_pow2(in_features)))
    k_per_split = cdiv(cdiv(in_features, cfg["SPLIT_K"]), block_k) * block_k
    num_splits = cdiv(in_features, k_per_split)
    h_shape = (num_splits, n_slices, t, meta.max_k, r_max)
    h_strides = (n_slices * t * meta.max_k * r_max, t * meta.max_k * r_max, meta.max_k * r_max)
    a0 = lora_a[0]
    ints = (in_features, k_per_split, slots, x.stride(0), a0.stride(0), a0.stride(1), *h_strides)
    if meta.num_active == 0 or meta.grid_tiles == 0:
        return h_shape, [], ints
    kp, chunk = rank_chunk(r_max, meta.tile_k)
    # A config tuned on tiles of one adapter may not fit tiles of four (the fused path's
    # 512-wide K blocks at 4 stages needed 240 KB with K=4 in a 7B engine step).
    stage_bytes = (meta.block_m + kp * chunk) * block_k * x.element_size()
    limit = shared_memory_limit(x.device)
    cfg = {**cfg, "num_stages": fit_stages(cfg["num_stages"], stage_bytes, limit)}
    launches = []
    for g0, g1 in slice_groups(n_slices):
        constexprs = dict(
            TILE_K=meta.tile_k,
            KP=kp,
            RANK_CHUNK=chunk,
            R_MAX=r_max,
            BLOCK_M=meta.block_m,
            BLOCK_K=block_k,
            N_SLICES=g1 - g0,
            EVEN_K=in_features % k_per_split == 0,
            EVEN_R=r_max % chunk == 0,
            UPCAST=INTERPRET,
            DOT_PRECISION=dot_precision(x.dtype),
            USE_PDL=pdl,
        )
        grid = (meta.grid_tiles, num_splits, g1 - g0)
        launches.append((g0, g1, grid, constexprs, launch_options(x.device, cfg)))
    return h_shape, launches, ints
