"""Fused elementwise ops for the CUDA path: RMSNorm, rotary embedding, SiLU-and-mul.

In eager torch each of these is 4-12 small kernels; at decode sizes a 7B step spent more time
in ~1,400 such launches (inside the CUDA graph) than in a third of its GEMMs. One Triton
program per token row each, launched through :class:`kernels._launch.Launcher` (eager
prefill steps launch them 4 times a layer). The CPU path keeps the plain-torch ops (bit-exact vs transformers).
Numerics follow transformers: RMSNorm and RoPE in fp32, rounded once to the model dtype.
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


@triton.jit
def _rope_kernel(
    X,
    D,
    Out,
    COS,
    SIN,
    POS,
    stride_xt,
    stride_xh,
    stride_dt,
    stride_dh,
    stride_ot,
    stride_oh,
    stride_c,
    n_heads,
    HALF: tl.constexpr,
    HP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ADD: tl.constexpr,
):
    t = tl.program_id(0)
    p = tl.load(POS + t)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HP)
    hm = h < n_heads
    dm = d < HALF
    m = hm[:, None] & dm[None, :]
    cos = tl.load(COS + p * stride_c + d, mask=dm, other=0.0)[None, :]
    sin = tl.load(SIN + p * stride_c + d, mask=dm, other=0.0)[None, :]
    base = X + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(base, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=m, other=0.0).to(tl.float32)
    if ADD:  # x + d, rounded as the sum would be if it were stored first
        dbase = D + t * stride_dt + h[:, None] * stride_dh + d[None, :]
        d1 = tl.load(dbase, mask=m, other=0.0).to(tl.float32)
        d2 = tl.load(dbase + HALF, mask=m, other=0.0).to(tl.float32)
        x1 = (x1 + d1).to(Out.dtype.element_ty).to(tl.float32)
        x2 = (x2 + d2).to(Out.dtype.element_ty).to(tl.float32)
    ob = Out + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(ob, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=m)
    tl.store(ob + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=m)


_launch_rope = Launcher(_rope_kernel)


def rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    d: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [T, H, D] (any token/head strides, unit last stride); cos/sin: [max_pos, D] fp32.
    With d (x's shape and dtype, any token/head strides: a LoRA delta the qkv projection
    left apart, kernels.linear_beside_lora), rotates x + d."""
    t, h, hd = x.shape
    if d is not None and (d.shape != x.shape or d.dtype != x.dtype or d.stride(2) != 1):
        raise ValueError(f"rope: d must match x {list(x.shape)} {x.dtype}, unit last stride")
    dd = x if d is None else d
    out = torch.empty(t, h, hd, dtype=x.dtype, device=x.device)
    if t:
        _launch_rope(
            (t,),
            (
                x,
                dd,
                out,
                cos,
                sin,
                positions,
                x.stride(0),
                x.stride(1),
                dd.stride(0),
                dd.stride(1),
                out.stride(0),
                out.stride(1),
                cos.stride(0),
                h,
            ),
            {
                "HALF": hd // 2,
                "HP": triton.next_power_of_2(hd // 2),
                "BLOCK_H": triton.next_power_of_2(h),
                "ADD": d is not None,
            },
            {"num_warps": 4},
        )
    return out


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
