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

Numerics follow the unfused path: the base tile is rounded to y's dtype; ``h * w * scale`` is
rounded to the weights' dtype (as PEFT rounds lora_A's output), the delta accumulated in fp32
and rounded once; the two rounded values are added and rounded.

Slices (fused qkv, gate/up) are a grid axis, as in the expand: slice s owns columns
[off_s, off_s + out_s) of y and the same rows of W.

Measured on the H100 (docs/benchmarks.md, seventeenth pass): with one or two adapters at 1-16
tokens the pair costs 0.98-1.09x cuBLAS's projection alone, on gate/up with 8 at 16-64 tokens
1.05-1.08x (K=2 at 64 tokens: 1.14); with many adapters the epilogue's walk over them, after
the main loop, costs more than the unfused kernels running beside the GEMM, and whole 7B
decode steps at 8-64 tokens stay faster with the delta beside the GEMM. The engine uses it
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
)
from kernels._launch import Launcher
from kernels._slices import slice_of_b
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
_UNSPECIALIZED = ("num_tokens", "stride_hsp", "stride_hs")


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _fused_linear_lora_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    h_ptr,
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
    num_slots,
    stride_xt,
    stride_wn,
    stride_yt,
    stride_bn,
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
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + offs_k
            if EVEN_K:
                xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)
                wt = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
            else:
                k_ok = k < in_features
                xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter mishandles bf16 arithmetic
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc += tl.dot(xt, tl.trans(wt), input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)
        out = acc.to(y_ptr.dtype.element_ty)

        if HAS_LORA:
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

    Two launches with LoRA (the shrink, then this kernel as its programmatic dependent), one
    without (``meta`` None or no active token: a plain skinny GEMM); no host synchronisation,
    nothing allocated but y and the shrink's small fp32 output, so the call can be captured
    in a CUDA graph. Meant for decode sizes: W is streamed once per BLOCK_M tokens.

    Args:
        x: [T, in], fp32/fp16/bf16, rows contiguous.
        weight: [sum(out_s), in], x's dtype, rows contiguous; bias: [sum(out_s)] or None.
        lora_a, lora_b, ranks, scales: as in :func:`kernels.add_lora` (at most 3 slices),
            or all None for the base GEMM alone.
        meta: the step's :class:`LoraBatchMeta`, or None.
        config: launch parameters overriding the tuned ones (BLOCK_M, BLOCK_N, BLOCK_K,
            num_warps, num_stages, SLOTS_PER_STEP, and the shrink's SHRINK_SPLIT_K,
            SHRINK_BLOCK_K, SHRINK_STAGES, SHRINK_WARPS).
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
    pdl = lora and pdl_supported(x.device)
    if lora:
        if shrink_config is None:
            shrink_config = fused_shrink_config(cfg, t, in_features, x.device)
        h = lora_shrink(x, lora_a, ranks, meta, config=shrink_config)
        slots, r_max = lora_b[0].shape[0], lora_b[0].shape[2]
        b = pad3(lora_b, lora_b[0])
        sbs = pad3([bb.stride(0) for bb in lora_b], 0)
        lora_args = (h, b[0], b[1], b[2], ranks, scales, meta.token_slots, meta.token_weights,
                     meta.slot_list)  # fmt: skip
        h_strides = h.stride()[:3]
        stride_bn, max_k, num_splits = lora_b[0].stride(1), meta.max_k, h.shape[0]
    else:  # placeholders the kernel never reads
        slots, r_max, sbs, h_strides, stride_bn, max_k, num_splits = (
            1,
            16,
            [0] * 3,
            (0,) * 3,
            0,
            1,
            1,
        )
        lora_args = (y,) * 9
    offs = [sum(outs[:i]) for i in range(len(outs))]
    args = (
        x, weight, bias if bias is not None else y, y, *lora_args, t, in_features,
        *pad3(outs, 0), *pad3(offs, 0), *sbs, slots, x.stride(0), weight.stride(0),
        y.stride(0), stride_bn, *h_strides,
    )  # fmt: skip
    constexprs = dict(
        HAS_BIAS=bias is not None,
        HAS_LORA=lora,
        MAX_K=max_k,
        R_MAX=r_max,
        RP=max(16, next_pow2(r_max)),
        KP=next_pow2(max_k),
        # rows are (token, k) pairs: K adapters a token take K times the rows, so a group
        # holds 1/K as many adapters (the tile of h it selects from keeps its tuned size)
        SLOTS_PER_STEP=max(1, cfg.get("SLOTS_PER_STEP", _SLOTS_PER_STEP) // next_pow2(max_k)),
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
    grid = (triton.cdiv(max(outs), block_n), triton.cdiv(t, block_m), len(outs))
    _launch_fused(grid, args, constexprs, launch_options(x.device, cfg, dependent=pdl))
    return y
