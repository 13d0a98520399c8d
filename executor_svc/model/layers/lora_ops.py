"""Backend dispatch for the LoRA delta of one projection (the role of vLLM's punica_wrapper).

On CUDA the Triton kernels run: a base GEMM (cuBLAS, or our skinny Triton GEMM up to the
GPU's measured token limit: 64 on the H100) with the delta's own kernels
(:func:`kernels.add_lora`, :func:`kernels.linear_beside_lora`), or, up to another measured
limit (0 on the H100), one GEMM with the delta in its epilogue
(:func:`kernels.fused_linear_lora`). On CPU a vectorised torch path (gather + two einsums)
computes the same thing: the kernels' own reference (:func:`kernels.add_lora_ref`) is a
per-token loop and too slow for whole forward passes, so this path is tested against it
instead (tests/executor/test_model_ops.py).

Semantics (both paths):
    for t in range(num_tokens):
        for (slot, w) in plan[t]:
            for s in range(n_slices):
                y[t, off_s:off_s + out_s] += (w * scales[s, slot]
                    * (x[t] @ A[s][slot].T) @ B[s][slot].T)
A and B are zero-padded beyond each slot's rank, so the padding contributes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels import LoraBatchMeta, add_lora, fused_linear_lora, linear_beside_lora
from kernels.fused_linear_lora_op import fused_preferred


def add_lora_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: torch.Tensor,
    meta: LoraBatchMeta,
) -> None:
    """y += delta; x: [T, in], lora_a[s]: [slots, r, in], lora_b[s]: [slots, out_s, r]."""
    if meta.num_active == 0:
        return
    slots = meta.token_slots.long()  # [T, K]
    valid = slots >= 0
    idx = slots.clamp(min=0)
    weights = meta.token_weights.float() * valid
    xf = x.float()
    off = 0
    for s, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
        coef = weights * scales[s].float()[idx]  # [T, K]
        h = torch.einsum("ti,tkri->tkr", xf, a[idx].float()) * coef.unsqueeze(-1)
        delta = torch.einsum("tkr,tkor->to", h, b[idx].float())
        out_s = b.shape[1]
        y[:, off : off + out_s] += delta.to(y.dtype)
        off += out_s


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, or our skinny GEMM where this GPU's measurements prefer it."""
    if fused_preferred(x, None, lora=False):
        return fused_linear_lora(x, weight, bias, None, None, None, None, None)
    return F.linear(x, weight, bias)


def _single_kernel(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
) -> torch.Tensor | None:
    """The projection with its delta where the delta needs no kernels of its own: no token
    has an adapter (the base projection alone), or the fused kernel is preferred; else None."""
    if meta.num_active == 0:
        return base_linear(x, weight, bias)
    if fused_preferred(x, lora_b, lora=True):
        return fused_linear_lora(x, weight, bias, lora_a, lora_b, ranks, scales, meta)
    return None


def linear_with_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` plus the step's LoRA deltas, on the device's best path."""
    y = _single_kernel(x, weight, bias, lora_a, lora_b, ranks, scales, meta)
    if y is not None:
        return y
    y = F.linear(x, weight, bias)
    if x.is_cuda:
        add_lora(y, x, lora_a, lora_b, ranks, scales, meta)
    else:
        add_lora_torch(y, x, lora_a, lora_b, scales, meta)
    return y


def linear_beside_delta(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
    into: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, into)`` whose sum is the projection plus its LoRA delta (plus ``into``): the delta
    goes into ``into`` when given, else into y (None comes back), or, on CUDA captured in a
    graph, into a new buffer (its kernels then run beside the base GEMM; see
    kernels.linear_beside_lora). Where the fused kernel runs, the delta is in y and ``into``
    comes back untouched."""
    y = _single_kernel(x, weight, bias, lora_a, lora_b, ranks, scales, meta)
    if y is not None:
        return y, into
    if x.is_cuda:
        return linear_beside_lora(x, weight, bias, lora_a, lora_b, ranks, scales, meta, into)
    if into is None:
        return linear_with_lora(x, weight, bias, lora_a, lora_b, ranks, scales, meta), None
    add_lora_torch(into, x, lora_a, lora_b, scales, meta)
    return F.linear(x, weight, bias), into
