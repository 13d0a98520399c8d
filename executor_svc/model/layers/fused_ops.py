"""Fused elementwise ops for the CUDA path: RMSNorm, rotary embedding, SiLU-and-mul.

In eager torch each of these is 4-12 small kernels; at decode sizes a 7B step spent more time
in ~1,400 such launches (inside the CUDA graph) than in a third of its GEMMs. One Triton
program per token row each, launched through :class:`kernels._launch.Launcher` (eager
prefill steps launch them 4 times a layer). The CPU path keeps the plain-torch ops (bit-exact
vs transformers). Numerics follow transformers: RMSNorm and RoPE in fp32, rounded once to the model dtype.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels._launch import Launcher  # noqa: E402


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, 0) / n
    normed = (x * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + cols, normed * w, mask=mask)


_launch_rms_norm = Launcher(_rms_norm_kernel)


@triton.jit
def _add_rms_norm_kernel(
    X, R, S, W, Y, stride_x, stride_r, stride_s, stride_y, n, eps, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    total = (x + r).to(S.dtype.element_ty)  # rounded as the stored sum (torch's x + r)
    tl.store(S + row * stride_s + cols, total, mask=mask)
    t = total.to(tl.float32)
    var = tl.sum(t * t, 0) / n
    normed = (t * tl.rsqrt(var + eps)).to(Y.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + cols, normed * w, mask=mask)


_launch_add_rms_norm = Launcher(_add_rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.shape[-1]
    _launch_rms_norm(
        (x.shape[0],),
        (x, weight, y, x.stride(0), y.stride(0), n, eps),
        {"BLOCK": triton.next_power_of_2(n)},
        {"num_warps": 8},
    )
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm in one launch (a program per row).

    Semantics:
        s = x + residual                  (rounded to x's dtype, as torch's add)
        y = rms_norm(s, weight, eps)
        returns (s, y), new tensors

    x, residual: [T, n] of one dtype, unit last stride. A decoder layer's two adds were a
    launch each, 1.5 us apiece at decode sizes (docs/benchmarks.md, twelfth pass).
    """
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
        raise ValueError(f"add_rms_norm: residual must match x {list(x.shape)} {x.dtype}")
    s = torch.empty_like(x)
    y = torch.empty_like(x)
    n = x.shape[-1]
    if x.shape[0]:
        _launch_add_rms_norm(
            (x.shape[0],),
            (
                x,
                residual,
                s,
                weight,
                y,
                x.stride(0),
                residual.stride(0),
                s.stride(0),
                y.stride(0),
                n,
                eps,
            ),  # fmt: skip
            {"BLOCK": triton.next_power_of_2(n)},
            {"num_warps": 8},
        )
    return s, y


@triton.jit
def _rotate_heads(
    X, D, Out, C, t, row, cos, sin, sxt, sxh, sdt, sdh, sot, soh, sct, n_heads,
    HALF: tl.constexpr, HP: tl.constexpr, BLOCK_H: tl.constexpr, ADD: tl.constexpr,
    CACHE: tl.constexpr,
):  # fmt: skip
    """Row t of x [T, H, 2 * HALF] (+ d) rotated into Out, and into row ``row`` of the cache C
    ([rows, H, 2 * HALF], heads contiguous) when CACHE; fp32 inside, rounded once."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HP)
    m = (h < n_heads)[:, None] & (d < HALF)[None, :]
    base = X + t * sxt + h[:, None] * sxh + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    if ADD:  # x + d, rounded as the sum would be if it were stored first
        dbase = D + t * sdt + h[:, None] * sdh + d[None, :]
        d1 = tl.load(dbase, mask=m, other=0.0).to(tl.float32)
        d2 = tl.load(dbase + HALF, mask=m, other=0.0).to(tl.float32)
        x1 = (x1 + d1).to(Out.dtype.element_ty).to(tl.float32)
        x2 = (x2 + d2).to(Out.dtype.element_ty).to(tl.float32)
    lo = (x1 * cos - x2 * sin).to(Out.dtype.element_ty)
    hi = (x2 * cos + x1 * sin).to(Out.dtype.element_ty)
    ob = Out + t * sot + h[:, None] * soh + d[None, :]
    tl.store(ob, lo, mask=m)
    tl.store(ob + HALF, hi, mask=m)
    if CACHE:
        cb = C + row * sct + h[:, None] * (2 * HALF) + d[None, :]
        tl.store(cb, lo, mask=m)
        tl.store(cb + HALF, hi, mask=m)


@triton.jit
def _rope_qkv_kernel(
    Q, K, V, DQ, DK, DV, QO, KO, VO, KC, VC, SLOTS, COS, SIN, POS,
    sqt, sqh, skt, skh, svt, sdqt, sdqh, sdkt, sdkh, sdvt, sqot, sqoh, skot, skoh, svot, sct,
    stride_c, n_q, n_kv,
    HALF: tl.constexpr, HP: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    BLOCK_V: tl.constexpr, ADD: tl.constexpr, CACHE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    p = tl.load(POS + t)
    row = 0
    if CACHE:
        row = tl.load(SLOTS + t)
    d = tl.arange(0, HP)
    cos = tl.load(COS + p * stride_c + d, mask=d < HALF, other=0.0)[None, :]
    sin = tl.load(SIN + p * stride_c + d, mask=d < HALF, other=0.0)[None, :]
    _rotate_heads(Q, DQ, QO, QO, t, row, cos, sin, sqt, sqh, sdqt, sdqh, sqot, sqoh, 0, n_q,
                  HALF, HP, BLOCK_HQ, ADD, False)  # fmt: skip
    _rotate_heads(K, DK, KO, KC, t, row, cos, sin, skt, skh, sdkt, sdkh, skot, skoh, sct, n_kv,
                  HALF, HP, BLOCK_HKV, ADD, CACHE)  # fmt: skip
    if ADD or CACHE:  # v + dv (the value projection's LoRA delta), heads contiguous in a row
        c = tl.arange(0, BLOCK_V)
        cm = c < n_kv * 2 * HALF
        v = tl.load(V + t * svt + c, mask=cm, other=0.0)
        if ADD:
            dv = tl.load(DV + t * sdvt + c, mask=cm, other=0.0).to(tl.float32)
            v = (v.to(tl.float32) + dv).to(VO.dtype.element_ty)
            tl.store(VO + t * svot + c, v, mask=cm)
        if CACHE:
            tl.store(VC + row * sct + c, v, mask=cm)


_launch_rope_qkv = Launcher(_rope_qkv_kernel)


def rope_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE of a layer's q and k, the value delta and the KV cache write, in one launch (a
    program per token).

    Semantics:
        q', k', v' = rotate(q + dq), rotate(k + dk), v + dv   (each sum rounded to the dtype)
        k_cache[slots[t]], v_cache[slots[t]] = k'[t], v'[t]   for every token t (kv_cache given)

    q: [T, Hq, D], k and v: [T, Hkv, D] (any token/head strides, unit last stride; v's heads
    contiguous within a token: views of the fused qkv output); cos/sin: [max_pos, D] fp32.
    dq, dk, dv (all or none; shaped and typed as q, k, v, any strides as those): a qkv LoRA
    delta the projection left apart (kernels.linear_beside_lora). kv_cache: the layer's
    (k_cache, v_cache), each [rows, Hkv, D] contiguous, k's dtype; slots: [T] int64, the
    cache row of each token (a decode step's two index_copy launches were 6 us a layer, on
    the critical path). Returns (q', k', v'): q' and k' new contiguous tensors; v' is v
    itself when dv is None.
    """
    t, hq, hd = q.shape
    hkv = k.shape[1]
    deltas = (dq, dk, dv)
    if any(x is None for x in deltas) != all(x is None for x in deltas):
        raise ValueError("rope_qkv: give dq, dk and dv together, or none")
    if dq is not None and any(
        dd.shape != x.shape or dd.dtype != x.dtype or dd.stride(2) != 1
        for dd, x in zip(deltas, (q, k, v), strict=True)
    ):
        raise ValueError("rope_qkv: each delta must match its q/k/v in shape and dtype")
    for x in (v, dv):
        if x is not None and (x.stride(2) != 1 or x.stride(1) != hd):
            raise ValueError("rope_qkv: v's heads must be contiguous within a token")
    if kv_cache is not None and (
        slots is None
        or slots.shape != (t,)
        or any(
            c.shape[1:] != (hkv, hd) or c.dtype != k.dtype or not c.is_contiguous()
            for c in kv_cache
        )  # fmt: skip
        or kv_cache[0].shape != kv_cache[1].shape
    ):
        raise ValueError("rope_qkv: kv_cache must be two contiguous [rows, Hkv, D] caches "
                         "of k's dtype, with a [T] slots tensor")  # fmt: skip
    qo = torch.empty(t, hq, hd, dtype=q.dtype, device=q.device)
    ko = torch.empty(t, hkv, hd, dtype=k.dtype, device=k.device)
    vo = v if dv is None else torch.empty(t, hkv, hd, dtype=v.dtype, device=v.device)
    kc, vc = (ko, vo) if kv_cache is None else kv_cache
    if t:
        dq, dk, dv = (q, k, v) if dq is None else (dq, dk, dv)
        _launch_rope_qkv(
            (t,),
            (
                q,
                k,
                v,
                dq,
                dk,
                dv,
                qo,
                ko,
                vo,
                kc,
                vc,
                positions if slots is None else slots,
                cos,
                sin,
                positions,
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                v.stride(0),
                dq.stride(0),
                dq.stride(1),
                dk.stride(0),
                dk.stride(1),
                dv.stride(0),
                qo.stride(0),
                qo.stride(1),
                ko.stride(0),
                ko.stride(1),
                vo.stride(0),
                kc.stride(0),
                cos.stride(0),
                hq,
                hkv,
            ),  # fmt: skip
            {
                "HALF": hd // 2,
                "HP": triton.next_power_of_2(hd // 2),
                "BLOCK_HQ": triton.next_power_of_2(hq),
                "BLOCK_HKV": triton.next_power_of_2(hkv),
                "BLOCK_V": triton.next_power_of_2(hkv * hd),
                "ADD": deltas[0] is not None,
                "CACHE": kv_cache is not None,
            },
            {"num_warps": 4},
        )
    return qo, ko, vo


@triton.jit
def _silu_mul_kernel(
    X, D, Y, stride_x, stride_d, stride_y, n, BLOCK: tl.constexpr, ADD: tl.constexpr
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + n + cols, mask=mask, other=0.0)
    if ADD:  # x + d, rounded as the sum would be if it were stored first
        dg = tl.load(D + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        g = (g + dg).to(Y.dtype.element_ty).to(tl.float32)
        du = tl.load(D + row * stride_d + n + cols, mask=mask, other=0.0).to(tl.float32)
        u = (u.to(tl.float32) + du).to(Y.dtype.element_ty)
    act = (g / (1.0 + tl.exp(-g))).to(Y.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, act * u, mask=mask)


_launch_silu_mul = Launcher(_silu_mul_kernel)


def silu_and_mul(x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, 2n] = [gate | up] -> silu(gate) * up, [T, n]; with d ([T, 2n], a LoRA delta the
    gate/up projection left apart: kernels.linear_beside_lora), of x + d."""
    t, n2 = x.shape
    n = n2 // 2
    y = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if d is not None and (d.shape != x.shape or d.dtype != x.dtype or d.stride(1) != 1):
        raise ValueError(f"silu_and_mul: d must match x {list(x.shape)} {x.dtype}")
    block = 1024
    if t:
        _launch_silu_mul(
            (t, triton.cdiv(n, block)),
            (
                x,
                x if d is None else d,
                y,
                x.stride(0),
                0 if d is None else d.stride(0),
                y.stride(0),
                n,
            ),
            {"BLOCK": block, "ADD": d is not None},
            {"num_warps": 4},
        )
    return y
