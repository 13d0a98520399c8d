"""The base projection and its LoRA delta in one kernel, for decode-sized batches.

At decode sizes a projection is a skinny GEMM bound by reading its weight W once; the LoRA
delta, run as its own shrink and expand, reads x again, reads and writes y again and pays two
more kernel latencies. Here one kernel computes a tile of ``y = x W^T + b`` and, in its
epilogue, the tile's delta, so y is written once and there is no expand kernel. Each program
streams its BLOCK_N rows of W against BLOCK_M tokens (all of a decode batch, so W is read
once); its epilogue then walks the adapters the step uses (``meta.slot_list``), and for each
multiplies, on the tensor cores, that adapter's B rows of the tile's columns (contiguous along
r) by the rows of h whose token uses it (the others masked to zero). Rows are (token, k)
pairs, so K adapters per token cost no extra pass; their products are summed per token at the
end. h is the shrink's output (:func:`kernels.lora_shrink`, with few K splits, summed here once);
the kernel is a programmatic dependent of the shrink, so its main loop streams W while the
shrink runs and it waits for h only before the epilogue.

With one or two adapters in the step there is no shrink kernel: the main loop multiplies each
x tile it has loaded by the adapters' A rows of the same columns as well (one more tile and one
more dot a step), so every program computes h = x A^T for its tokens against each of the
step's adapters, and the epilogue weights its columns per token (the mixture weight for that
adapter, 0 if the token does not use it, times its scale). Each program reads the adapters' A
again from the L2, so this pays only for few adapters; which counts it takes is measured per
GPU and shape (config key LOOP_USED, ``bench/fused_linear_bench.py --sweep-loop``). Adapters
past what the loop carries are shrunk after it, x read again, so the result is right for any
step (a captured graph replays later steps with the plan of the first).

Numerics follow the unfused path: the base tile is rounded to y's dtype; ``h * w * scale`` is
rounded to the weights' dtype (as PEFT rounds lora_A's output), the delta accumulated in fp32
and rounded once; the two rounded values are added and rounded.

Slices (fused qkv, gate/up) are a grid axis, as in the expand: slice s owns columns
[off_s, off_s + out_s) of y and the same rows of W.

Measured on the H100 (docs/benchmarks.md, seventeenth and twenty-first passes): with one or two
adapters at 1-16 tokens the pair costs 0.96-1.08x cuBLAS's projection alone, with one at 64
tokens 1.01-1.08x except o (1.23), on gate/up with 8 at 16-64 tokens 1.03-1.17x; with many
adapters the epilogue's walk over them, after the main loop, costs more than the unfused
kernels running beside the GEMM, and whole 7B decode steps at 8-64 tokens stay faster with the
delta beside the GEMM. The engine uses it
where the GPU's config says it wins (``fused_max_tokens``). Without a delta it is a skinny
GEMM that beat cuBLAS in whole 7B decode steps at 1-64 tokens on the H100 (ninth pass): the
engine's base projections use it there, and steps with adapters run it beside the delta's
kernels at the token counts where that measured faster (:func:`kernels.linear_beside_lora`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from kernels._common import (
    INTERPRET,
    SLICES_PER_LAUNCH,
    check_meta,
    check_operands,
    dot_precision,
    launch_options,
    next_pow2,
    pad3,
    pdl_supported,
    shared_memory_limit,
)
from kernels._launch import Launcher
from kernels._slices import slice_of_a, slice_of_b
from kernels.config import fused_max_tokens, kernel_config
from kernels.lora_shrink_op import lora_shrink
from kernels.metadata import LoraBatchMeta

# The shrink's K splits on this path (config key SHRINK_SPLIT_K): every program of the GEMM
# sums the partials of its rows, so the unfused path's 32 splits would cost each 32 loads.
_SHRINK_SPLIT_K = 4
# The shrink's own launch shape on this path, where the fused config gives one: config key ->
# the shrink config's key. Its programs run beside the GEMM's, which fill the GPU in one
# wave: a few programs with long pipelined loads (1-4 splits, BLOCK_K 256-512, mostly 4
# stages) took 1-6 us less than the unfused path's shape with fewer splits (seventeenth pass).
_SHRINK_KEYS = {
    "SHRINK_SPLIT_K": "SPLIT_K",
    "SHRINK_BLOCK_K": "BLOCK_K",
    "SHRINK_STAGES": "num_stages",
    "SHRINK_WARPS": "num_warps",
}
# Adapters per step of the epilogue's walk (config key SLOTS_PER_STEP): their B tiles are
# loaded together, so the walk waits for memory once per group instead of once per adapter.
_SLOTS_PER_STEP = 4
# Columns of h (adapters times padded rank) that the GEMM's main loop computes itself, with no
# shrink kernel (config key LOOP_COLS; see _shrink_in_loop): two rank-16 adapters.
_LOOP_COLS = 32
# Columns of x per step when adapters past what the loop carries are shrunk after it. Its
# loads are not pipelined and go through registers: at the main loop's BLOCK_K they set the
# kernel's register count (compiled for sm_90: qkv, 1 token, one adapter 146 registers, 96
# with 32 columns, as many as the GEMM alone), though they run only when a step has more
# adapters than the host planned for.
_LATE_BLOCK_K = 32
_UNSPECIALIZED = ("num_tokens", "stride_hsp", "stride_hs")


@triton.jit
def _offs_q(LOOP_SLOTS: tl.constexpr, RP: tl.constexpr):
    """Columns q = (adapter j of a group, rank row r), j-major."""
    return tl.arange(0, LOOP_SLOTS * RP)


@triton.jit
def _group_operands(slot_list_ptr, ranks_ptr, a_ptr, stride_as, stride_ar, i0, n_used,
                    LOOP_SLOTS: tl.constexpr, RP: tl.constexpr, R_MAX: tl.constexpr):  # fmt: skip
    """For the step's adapters i0 .. i0 + LOOP_SLOTS - 1, per column q = (j, r): the slot,
    whether the column is live (an adapter of the step, r below its rank) and A's row."""
    offs_q = _offs_q(LOOP_SLOTS, RP)
    q_used = i0 + offs_q // RP < n_used
    slot_q = tl.load(slot_list_ptr + 1 + i0 + offs_q // RP, mask=q_used, other=-1)
    rank_q = tl.load(ranks_ptr + slot_q, mask=q_used, other=0)
    q_live = q_used & (offs_q % RP < tl.minimum(rank_q, R_MAX))
    a_rows = a_ptr + slot_q.to(tl.int64) * stride_as + (offs_q % RP) * stride_ar
    return slot_q, q_live, a_rows


@triton.jit
def _x_tile(x_rows, m_ok, k, in_features, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """Rows of x (or of W) of the tile, columns k; zero in rows not ``m_ok`` and past
    in_features."""
    if EVEN_K:
        xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)
    else:
        xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < in_features)[None, :],
                     other=0.0)  # fmt: skip
    if UPCAST:  # the interpreter mishandles bf16 arithmetic
        xt = xt.to(tl.float32)
    return xt


@triton.jit
def _x_times_a(xt, a_rows, q_live, k, in_features, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr):  # fmt: skip
    """x's tile [M, BLOCK_K] times the group's A rows of the same columns: [M, LOOP_SLOTS * RP],
    zero in the columns that are not live."""
    if EVEN_K:
        at = tl.load(a_rows[:, None] + k[None, :], mask=q_live[:, None], other=0.0)
    else:
        at = tl.load(a_rows[:, None] + k[None, :],
                     mask=q_live[:, None] & (k < in_features)[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        at = at.to(tl.float32)
    return tl.dot(xt, tl.trans(at), input_precision=DOT_PRECISION)


@triton.jit
def _group_delta(h, slot_q, q_live, b_ptr, stride_bs, stride_bn, offs_n, n_ok, offs_m, m_ok,
                 token_slots_ptr, token_weights_ptr, scales_ptr, MAX_K: tl.constexpr,
                 LOOP_SLOTS: tl.constexpr, RP: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):  # fmt: skip
    """The delta [M, BLOCK_N] of one group of adapters, from h = x A^T of every token against
    each of the group's adapters: column q = (j, r) of h is weighted by the token's mixture
    weight for adapter j (0 if the token does not use it) times j's scale, rounded to the
    weights' dtype (as PEFT rounds lora_A's output), and multiplied by the group's B rows of
    this tile's columns on the tensor cores."""
    coef = tl.zeros([h.shape[0], LOOP_SLOTS * RP], dtype=tl.float32)
    for kk in tl.static_range(MAX_K):
        slot_m = tl.load(token_slots_ptr + offs_m * MAX_K + kk, mask=m_ok, other=-1)
        w_m = tl.load(token_weights_ptr + offs_m * MAX_K + kk, mask=m_ok, other=0.0)
        hit = (slot_m[:, None] == slot_q[None, :]) & q_live[None, :]
        coef += tl.where(hit, w_m[:, None], 0.0)
    coef = coef * tl.load(scales_ptr + slot_q, mask=q_live, other=0.0)[None, :]
    hd = (h * coef).to(b_ptr.dtype.element_ty)
    offs_r = _offs_q(LOOP_SLOTS, RP) % RP
    bt = tl.load(
        b_ptr
        + slot_q.to(tl.int64)[None, :] * stride_bs
        + offs_n[:, None] * stride_bn
        + offs_r[None, :],
        mask=n_ok[:, None] & q_live[None, :],
        other=0.0,
    )
    if UPCAST:
        return tl.dot(hd.to(tl.float32), tl.trans(bt.to(tl.float32)),
                      input_precision=DOT_PRECISION)  # fmt: skip
    return tl.dot(hd, tl.trans(bt), input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _fused_linear_lora_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    h_ptr,
    a0_ptr,
    a1_ptr,
    a2_ptr,
    b0_ptr,
    b1_ptr,
    b2_ptr,
    ranks_ptr,
    scales_ptr,
    token_slots_ptr,
    token_weights_ptr,
    slot_list_ptr,
    num_tokens,
    in_features,
    out0,
    out1,
    out2,
    off0,
    off1,
    off2,
    sbs0,
    sbs1,
    sbs2,
    sas0,
    sas1,
    sas2,
    num_slots,
    stride_xt,
    stride_wn,
    stride_yt,
    stride_bn,
    stride_ar,
    stride_hsp,
    stride_hs,
    stride_ht,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    MAX_K: tl.constexpr,
    R_MAX: tl.constexpr,
    RP: tl.constexpr,
    KP: tl.constexpr,
    SLOTS_PER_STEP: tl.constexpr,
    IN_LOOP: tl.constexpr,
    LOOP_SLOTS: tl.constexpr,
    LATE_BLOCK_K: tl.constexpr,
    LATE_EVEN_K: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    N_SLICES: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    s = tl.program_id(2)
    b_ptr, out_s, col_off, stride_bs = slice_of_b(
        s, b0_ptr, b1_ptr, b2_ptr, out0, out1, out2, off0, off1, off2, sbs0, sbs1, sbs2, N_SLICES
    )

    if n0 < out_s:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m_ok = offs_m < num_tokens
        n_ok = offs_n < out_s
        cols = col_off + offs_n  # this slice's columns of y, rows of W
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_LORA and IN_LOOP:
            # The shrink of the step's first LOOP_SLOTS adapters rides along the main loop: the
            # x tile is loaded already, so h costs only the A tile's load and one dot.
            a_ptr, stride_as = slice_of_a(s, a0_ptr, a1_ptr, a2_ptr, sas0, sas1, sas2, N_SLICES)
            n_used = tl.load(slot_list_ptr)
            slot_q, q_live, a_rows = _group_operands(
                slot_list_ptr, ranks_ptr + s * num_slots, a_ptr, stride_as, stride_ar, 0,
                n_used, LOOP_SLOTS, RP, R_MAX,
            )  # fmt: skip
            h = tl.zeros([BLOCK_M, LOOP_SLOTS * RP], dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + offs_k
            xt = _x_tile(x_rows, m_ok, k, in_features, EVEN_K, UPCAST)
            wt = _x_tile(w_rows, n_ok, k, in_features, EVEN_K, UPCAST)  # W's rows, as x's
            acc += tl.dot(xt, tl.trans(wt), input_precision=DOT_PRECISION)
            if HAS_LORA and IN_LOOP:
                h += _x_times_a(xt, a_rows, q_live, k, in_features, EVEN_K, UPCAST, DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)
        out = acc.to(y_ptr.dtype.element_ty)

        if HAS_LORA and IN_LOOP:
            delta = _group_delta(
                h, slot_q, q_live, b_ptr, stride_bs, stride_bn, offs_n, n_ok, offs_m, m_ok,
                token_slots_ptr, token_weights_ptr, scales_ptr + s * num_slots,
                MAX_K, LOOP_SLOTS, RP, UPCAST, DOT_PRECISION,
            )  # fmt: skip
            # Adapters past the first LOOP_SLOTS (a step with more than the host planned for,
            # as when a captured graph replays a later step): their shrink runs here, a group
            # at a time, x read again from the L2. Correct at any count; fast only for few.
            for i0 in range(LOOP_SLOTS, n_used, LOOP_SLOTS):
                slot_q, q_live, a_rows = _group_operands(
                    slot_list_ptr, ranks_ptr + s * num_slots, a_ptr, stride_as, stride_ar, i0,
                    n_used, LOOP_SLOTS, RP, R_MAX,
                )  # fmt: skip
                h = tl.zeros([BLOCK_M, LOOP_SLOTS * RP], dtype=tl.float32)
                for k0 in range(0, in_features, LATE_BLOCK_K):
                    k = k0 + tl.arange(0, LATE_BLOCK_K)
                    xt = _x_tile(x_rows, m_ok, k, in_features, LATE_EVEN_K, UPCAST)
                    h += _x_times_a(xt, a_rows, q_live, k, in_features, LATE_EVEN_K, UPCAST,
                                    DOT_PRECISION)  # fmt: skip
                delta += _group_delta(
                    h, slot_q, q_live, b_ptr, stride_bs, stride_bn, offs_n, n_ok, offs_m, m_ok,
                    token_slots_ptr, token_weights_ptr, scales_ptr + s * num_slots,
                    MAX_K, LOOP_SLOTS, RP, UPCAST, DOT_PRECISION,
                )  # fmt: skip
            delta = delta.to(y_ptr.dtype.element_ty).to(tl.float32)
            out = (out.to(tl.float32) + delta).to(y_ptr.dtype.element_ty)
        if HAS_LORA and not IN_LOOP:
            if USE_PDL:
                gdc_wait()  # the shrink's h is complete and visible past this point
            # Rows j = (token m, adapter k), m-major: h's and the metadata's own layout.
            offs_j = tl.arange(0, BLOCK_M * KP)
            jm = m0 + offs_j // KP
            jk = offs_j % KP
            j_ok = (jm < num_tokens) & (jk < MAX_K)
            slot_j = tl.load(token_slots_ptr + jm * MAX_K + jk, mask=j_ok, other=-1)
            used = slot_j >= 0
            rank_j = tl.minimum(
                tl.load(ranks_ptr + s * num_slots + slot_j, mask=used, other=0), R_MAX
            )
            coef = tl.load(token_weights_ptr + jm * MAX_K + jk, mask=used, other=0.0)
            coef = coef * tl.load(scales_ptr + s * num_slots + slot_j, mask=used, other=0.0)
            # Columns q = (adapter j of a group of SLOTS_PER_STEP, rank row r): h repeated per
            # j, so that one product covers a group of the step's adapters.
            offs_q = tl.arange(0, SLOTS_PER_STEP * RP)
            q_j = offs_q // RP
            q_r = offs_q % RP
            h_ok = q_r[None, :] < rank_j[:, None]  # the shrink leaves rows above a rank unset
            h_rows = h_ptr + s * stride_hs + jm.to(tl.int64)[:, None] * stride_ht
            h_rows += (jk * R_MAX)[:, None] + q_r[None, :]
            hs = tl.zeros([BLOCK_M * KP, SLOTS_PER_STEP * RP], dtype=tl.float32)
            for sp in tl.static_range(NUM_SPLITS):
                hs += tl.load(h_rows + sp * stride_hsp, mask=h_ok, other=0.0)
            # rounded to the weights' dtype between lora_A and lora_B, as in PEFT
            hs = (hs * coef[:, None]).to(b0_ptr.dtype.element_ty)
            # Per group of the adapters the step uses, one tensor-core product: their B rows of
            # this tile's columns (contiguous along r) against the rows of h that use each
            # (the others masked to zero). A group's B tiles are one load, in flight together.
            acc_j = tl.zeros([BLOCK_M * KP, BLOCK_N], dtype=tl.float32)
            b_cols = b_ptr + offs_n[:, None] * stride_bn + q_r[None, :]
            n_used = tl.load(slot_list_ptr)
            for i0 in range(0, n_used, SLOTS_PER_STEP):
                q_ok = i0 + q_j < n_used
                slot_q = tl.load(slot_list_ptr + 1 + i0 + q_j, mask=q_ok, other=-1)
                rank_q = tl.load(ranks_ptr + s * num_slots + slot_q, mask=q_ok, other=0)
                bt = tl.load(
                    b_cols + slot_q.to(tl.int64)[None, :] * stride_bs,
                    mask=n_ok[:, None] & (q_r < tl.minimum(rank_q, R_MAX))[None, :],
                    other=0.0,
                )
                # slot -1 (past the list) meets only unused rows, whose h is zero
                hd = tl.where(slot_j[:, None] == slot_q[None, :], hs, tl.zeros_like(hs))
                if UPCAST:  # the interpreter mishandles bf16 arithmetic
                    acc_j += tl.dot(hd.to(tl.float32), tl.trans(bt.to(tl.float32)),
                                    input_precision=DOT_PRECISION)  # fmt: skip
                else:
                    acc_j += tl.dot(hd, tl.trans(bt), input_precision=DOT_PRECISION)
            if KP == 1:  # noqa: SIM108 (a constexpr branch)
                delta = acc_j
            else:
                delta = tl.sum(tl.reshape(acc_j, [BLOCK_M, KP, BLOCK_N]), axis=1)
            delta = delta.to(y_ptr.dtype.element_ty).to(tl.float32)
            out = (out.to(tl.float32) + delta).to(y_ptr.dtype.element_ty)
        y_tile = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yt + cols[None, :]
        tl.store(y_tile, out, mask=m_ok[:, None] & n_ok[None, :])
    if HAS_LORA and USE_PDL:  # idle programs too: this grid never completes before the shrink's
        gdc_wait()


_launch_fused = Launcher(_fused_linear_lora_kernel, unspecialized=_UNSPECIALIZED)


def _shrink_in_loop(cfg: dict, meta: LoraBatchMeta, rp: int) -> tuple[bool, int]:
    """Whether the shrink rides along the GEMM's main loop, and for how many adapters.

    The main loop can carry the shrink of LOOP_COLS / RP adapters (config key LOOP_COLS,
    columns of h: adapters times their padded rank; fewer if the step uses fewer) at the
    cost of one more A tile and one more dot per step; more than that and every program's
    redundant A reads outgrow the separate shrink. So it is taken when the step uses at most
    that many adapters and, where the config entry has LOOP_USED
    (``fused_linear_bench.py --sweep-loop``), one of the counts listed there; or forced by
    the config key IN_LOOP (0/1) or LORASERVE_KERNELS_FUSED_IN_LOOP (A/B runs).
    A step with more adapters than the loop carries is still right: the rest are shrunk
    after the main loop (slowly), so a captured graph may replay any step."""
    most = max(1, cfg.get("LOOP_COLS", _LOOP_COLS) // rp)
    # no more than the step uses (a power of two, for the tile): masked rows still cost
    # shared memory and tensor-core work
    loop_slots = min(most, next_pow2(max(1, meta.num_used)))
    forced = os.environ.get("LORASERVE_KERNELS_FUSED_IN_LOOP", cfg.get("IN_LOOP"))
    if forced is not None and str(forced) != "":
        return bool(int(forced)), loop_slots
    # LOOP_USED: the counts for which it measured faster on this GPU and shape
    taken = meta.num_used <= most and meta.num_used in cfg.get("LOOP_USED", range(most + 1))
    return taken, loop_slots


def _loop_stages(num_stages: int, gemm_stage: int, a_stage: int, limit: int) -> int:
    """Pipeline stages for the GEMM with the shrink in its loop, whose A tile rides along x's
    and W's in shared memory: as many as fit ``limit`` bytes. This loop keeps a copy per
    stage (compiled for sm_90: 4 stages of 48 KB take 192 KB). Dropping more stages, so that
    an SM keeps as many programs as of the GEMM alone, was slower: 1.41x cuBLAS's projection
    instead of 0.98x at o with 16 tokens and 2 adapters (docs/benchmarks.md)."""
    stages = num_stages
    while stages > 1 and stages * (gemm_stage + a_stage) > limit:
        stages -= 1
    return stages


def _check_a(
    x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], ranks
) -> None:
    """The A slices the main loop reads (the shrink kernel checks its own)."""
    check_operands(x, lora_a, ranks, "fused_linear_lora")
    slots, r_max, in_features = lora_b[0].shape[0], lora_b[0].shape[2], x.shape[1]
    for aa in lora_a:
        if aa.dim() != 3 or tuple(aa.shape) != (slots, r_max, in_features) or aa.stride(2) != 1:
            raise ValueError(
                f"fused_linear_lora: A slices must be [{slots}, {r_max}, {in_features}] with "
                f"contiguous rows, got {tuple(aa.shape)}"
            )
        if aa.stride(1) != lora_a[0].stride(1):
            raise ValueError("fused_linear_lora: A slices must share their row stride")


def fused_shrink_config(cfg: dict, tokens: int, in_features: int, device) -> dict:
    """The shrink's launch parameters on the fused path: the fused config's SHRINK_* keys
    over the shrink's own tuned config for ``tokens`` (SHRINK_SPLIT_K defaulting to 4)."""
    out = dict(kernel_config("shrink", tokens, in_features, device))
    out["SPLIT_K"] = _SHRINK_SPLIT_K
    out.update({key: cfg[name] for name, key in _SHRINK_KEYS.items() if name in cfg})
    return out


def fused_supported(lora_b: Sequence[torch.Tensor] | None) -> bool:
    """Whether one launch covers the projection's slices (at most 3: fused qkv, gate/up)."""
    return lora_b is None or len(lora_b) <= SLICES_PER_LAUNCH


def fused_preferred(x: torch.Tensor, lora_b: Sequence[torch.Tensor] | None, lora: bool) -> bool:
    """Whether the engine should run the fused kernel for x's token count, with adapters
    (``lora``) or for the base projection alone: up to this GPU's measured limit
    (``fused_max_tokens`` in its config; on the H100 0 with adapters, where the delta in the
    epilogue never won a whole decode step, and 64 without), or up to
    LORASERVE_KERNELS_FUSED_MAX_TOKENS when set (A/B measurements). Never on the CPU or in the
    interpreter."""
    if not (x.is_cuda and not INTERPRET and fused_supported(lora_b)):
        return False
    forced = os.environ.get("LORASERVE_KERNELS_FUSED_MAX_TOKENS")
    limit = int(forced) if forced else fused_max_tokens(x.device, lora)
    return x.shape[0] <= limit


def fused_linear_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor] | None,
    lora_b: Sequence[torch.Tensor] | None,
    ranks: torch.Tensor | None,
    scales: torch.Tensor | None,
    meta: LoraBatchMeta | None,
    *,
    config: dict | None = None,
    shrink_config: dict | None = None,
) -> torch.Tensor:
    """``x W^T + b`` plus the step's LoRA delta, the delta in the GEMM's epilogue.

    Semantics:
        y = x @ weight.T + bias                                   (rounded to x's dtype)
        for t in range(num_tokens):
            for (slot, w) in plan[t]:                              # meta.token_slots/weights
                for s in range(n_slices):
                    r = ranks[s, slot]
                    delta[t, off_s:off_s + out_s] += (w * scales[s, slot]
                        * (x[t] @ A[s][slot, :r].T) @ B[s][slot, :, :r].T)
        return y + delta                        (delta rounded to x's dtype, then the sum)

    Two launches with LoRA (the shrink, then this kernel as its programmatic dependent) or,
    for the adapter counts whose shrink rides the GEMM's main loop (:func:`_shrink_in_loop`),
    one; one without (``meta`` None or no active token: a plain skinny GEMM). No host
    synchronisation, nothing allocated but y and the shrink's small fp32 output, so the call
    can be captured in a CUDA graph. Meant for decode sizes: W is streamed once per BLOCK_M
    tokens.

    Args:
        x: [T, in], fp32/fp16/bf16, rows contiguous.
        weight: [sum(out_s), in], x's dtype, rows contiguous; bias: [sum(out_s)] or None.
        lora_a, lora_b, ranks, scales: as in :func:`kernels.add_lora` (at most 3 slices),
            or all None for the base GEMM alone.
        meta: the step's :class:`LoraBatchMeta`, or None.
        config: launch parameters overriding the tuned ones (BLOCK_M, BLOCK_N, BLOCK_K,
            num_warps, num_stages, SLOTS_PER_STEP, the shrink's SHRINK_SPLIT_K,
            SHRINK_BLOCK_K, SHRINK_STAGES, SHRINK_WARPS, and its placement: IN_LOOP,
            LOOP_COLS, LOOP_USED).
        shrink_config: the shrink's (default: :func:`fused_shrink_config`).
    """
    if x.dim() != 2 or x.stride(1) != 1 or weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError("fused_linear_lora: x [T, in] and weight [out, in] need contiguous rows")
    if weight.shape[1] != x.shape[1] or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"fused_linear_lora: weight {tuple(weight.shape)} {weight.dtype} does not match "
            f"x {tuple(x.shape)} {x.dtype}"
        )
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"fused_linear_lora: bias must be [{weight.shape[0]}] of x's dtype")
    t, in_features = x.shape
    lora = meta is not None and lora_b is not None and meta.num_active > 0
    if lora_b is not None:
        if not fused_supported(lora_b) or lora_a is None or len(lora_a) != len(lora_b):
            raise ValueError("fused_linear_lora: 1 to 3 slices, as many A as B")
        check_operands(x, lora_b, ranks, "fused_linear_lora")
        b0 = lora_b[0]
        if any(
            bb.shape[0] != b0.shape[0] or bb.shape[2] != b0.shape[2] or bb.stride(1) != b0.stride(1)
            for bb in lora_b
        ):
            raise ValueError("fused_linear_lora: B slices must share slots, r_max and n stride")
        outs = [b.shape[1] for b in lora_b]
        if ranks.dtype != torch.int32 or scales is None or scales.dtype != torch.float32:
            raise ValueError("fused_linear_lora: ranks must be int32 and scales float32")
        if scales.shape != ranks.shape or not scales.is_contiguous():
            raise ValueError("fused_linear_lora: scales must be a contiguous [n_slices, slots]")
    else:
        outs = [weight.shape[0]]
    if sum(outs) != weight.shape[0] or len(outs) > SLICES_PER_LAUNCH:
        raise ValueError(
            f"fused_linear_lora: slices {outs} do not cover weight's {weight.shape[0]} rows"
        )
    if meta is not None:
        check_meta(meta, x.device, "fused_linear_lora")
        if meta.num_tokens != t:
            raise ValueError(f"fused_linear_lora: x has {t} rows; meta has {meta.num_tokens}")

    y = torch.empty(t, weight.shape[0], dtype=x.dtype, device=x.device)
    if t == 0:
        return y
    cfg = config or kernel_config("fused", t, weight.shape[0], x.device, in_features)
    block_m = cfg.get("BLOCK_M") or max(16, min(128, next_pow2(t)))
    block_n = min(cfg["BLOCK_N"], max(16, next_pow2(max(outs))))
    block_k = min(cfg["BLOCK_K"], max(16, next_pow2(in_features)))
    num_stages = cfg["num_stages"]
    in_loop, loop_slots = False, 1
    if lora:
        slots, r_max = lora_b[0].shape[0], lora_b[0].shape[2]
        rp = max(16, next_pow2(r_max))
        in_loop, loop_slots = _shrink_in_loop(cfg, meta, rp)
        b = pad3(lora_b, lora_b[0])
        sbs = pad3([bb.stride(0) for bb in lora_b], 0)
        stride_bn, max_k = lora_b[0].stride(1), meta.max_k
    if in_loop:
        _check_a(x, lora_a, lora_b, ranks)
        a = pad3(lora_a, lora_a[0])
        sas = pad3([aa.stride(0) for aa in lora_a], 0)
        stride_ar, h_strides, num_splits = lora_a[0].stride(1), (0,) * 3, 1
        lora_args = (y, *a, *b, ranks, scales, meta.token_slots, meta.token_weights,
                     meta.slot_list)  # fmt: skip
        num_stages = _loop_stages(
            num_stages, (block_m + block_n) * block_k * x.element_size(),
            loop_slots * rp * block_k * x.element_size(), shared_memory_limit(x.device),
        )  # fmt: skip
    elif lora:
        if shrink_config is None:
            shrink_config = fused_shrink_config(cfg, t, in_features, x.device)
        h = lora_shrink(x, lora_a, ranks, meta, config=shrink_config)
        lora_args = (h, y, y, y, *b, ranks, scales, meta.token_slots, meta.token_weights,
                     meta.slot_list)  # fmt: skip
        h_strides, num_splits, sas, stride_ar = h.stride()[:3], h.shape[0], [0] * 3, 0
    else:  # placeholders the kernel never reads
        slots, r_max, rp, sbs, sas, h_strides, stride_bn, stride_ar, max_k, num_splits = (
            1, 16, 16, [0] * 3, [0] * 3, (0,) * 3, 0, 0, 1, 1,
        )  # fmt: skip
        lora_args = (y,) * 12
    pdl = lora and not in_loop and pdl_supported(x.device)
    offs = [sum(outs[:i]) for i in range(len(outs))]
    args = (
        x, weight, bias if bias is not None else y, y, *lora_args, t, in_features,
        *pad3(outs, 0), *pad3(offs, 0), *sbs, *sas, slots, x.stride(0), weight.stride(0),
        y.stride(0), stride_bn, stride_ar, *h_strides,
    )  # fmt: skip
    constexprs = dict(
        HAS_BIAS=bias is not None,
        HAS_LORA=lora,
        MAX_K=max_k,
        R_MAX=r_max,
        RP=rp,
        KP=next_pow2(max_k),
        # rows are (token, k) pairs: K adapters a token take K times the rows, so a group
        # holds 1/K as many adapters (the tile of h it selects from keeps its tuned size)
        SLOTS_PER_STEP=max(1, cfg.get("SLOTS_PER_STEP", _SLOTS_PER_STEP) // next_pow2(max_k)),
        IN_LOOP=in_loop,
        LOOP_SLOTS=loop_slots,
        LATE_BLOCK_K=_LATE_BLOCK_K,
        LATE_EVEN_K=in_features % _LATE_BLOCK_K == 0,
        NUM_SPLITS=num_splits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        N_SLICES=len(outs),
        EVEN_K=in_features % block_k == 0,
        UPCAST=INTERPRET,
        DOT_PRECISION=dot_precision(x.dtype),
        USE_PDL=pdl,
    )
    options = launch_options(x.device, {**cfg, "num_stages": num_stages}, dependent=pdl)
    grid = (triton.cdiv(max(outs), block_n), triton.cdiv(t, block_m), len(outs))
    _launch_fused(grid, args, constexprs, options)
    return y
