"""A base projection and its LoRA delta with the delta's kernels beside the base GEMM.

The delta needs only x, not the base projection's output, so it need not wait for the GEMM:
captured into a CUDA graph, its kernels go on a side stream (a branch of the graph) and run
while the GEMM does. At decode sizes each LoRA kernel is a latency-bound launch of a few
microseconds; behind the GEMM on one stream they add their whole latency to every projection.

:func:`linear_beside_lora` returns the base projection and adds the delta into another tensor
(the residual stream, or a buffer that RoPE or the SiLU-and-mul adds in): shrink and expand
both run beside the GEMM, and the consumer of the two joins them. (Keeping y = x W^T + b +
delta instead, only the shrink can go beside the GEMM and the expand, which adds into y,
follows it: measured, that saved a third as much; docs/benchmarks.md.)

Eager calls run GEMM, shrink and expand in order on the current stream, the delta into y: a
fork and a join cost host time (two events), eager steps are host-bound or near it, and a
separate delta buffer costs a write and a read of it. :func:`overlapped` turns the branching
on outside a capture, so that warm-ups compile the variants a capture will launch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from kernels.add_lora_op import add_lora
from kernels.config import beside_triton_gemm_tokens, triton_gemm_beside
from kernels.fused_linear_lora_op import fused_linear_lora
from kernels.lora_expand_op import zero_rows_without_lora
from kernels.metadata import LoraBatchMeta

# LORASERVE_KERNELS_BRANCH=0 keeps the LoRA kernels on the calling stream (A/B measurements).
ENABLED = os.environ.get("LORASERVE_KERNELS_BRANCH", "1") != "0"
_side_streams: dict[int, torch.cuda.Stream] = {}
_heads: dict[int, torch.Tensor] = {}  # a word per device that a branch's head kernel writes
_forced = False


@contextlib.contextmanager
def overlapped() -> Iterator[None]:
    """Within the block, :func:`linear_beside_lora` branches eagerly too (as under capture)."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = _index(device)
    stream = _side_streams.get(index)
    if stream is None:  # high priority: its few programs go ahead of the GEMM's waiting ones
        stream = _side_streams[index] = torch.cuda.Stream(index, priority=-1)
    return stream


def _head_word(device: torch.device) -> torch.Tensor | None:
    index = _index(device)
    word = _heads.get(index)
    # Not allocated under a capture: from the graph's private pool it could outlive the graph.
    # (Warm-ups branch eagerly first, see overlapped(), so captures find it.)
    if word is None and not torch.cuda.is_current_stream_capturing():
        word = _heads[index] = torch.zeros(1, dtype=torch.int32, device=device)
    return word


def _branching(x: torch.Tensor, meta: LoraBatchMeta) -> bool:
    """Whether the LoRA kernels go on the side stream: on CUDA, with work, when captured."""
    if not (ENABLED and x.is_cuda and meta.num_active > 0 and meta.grid_tiles > 0):
        return False
    return _forced or torch.cuda.is_current_stream_capturing()


def linear_beside_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
    into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The base projection and the LoRA delta, for a caller that adds them: ``(y, into)``.

    Semantics:
        delta[t, off_s:off_s + out_s] = sum over (slot, w) in plan[t] of
            w * scales[s, slot] * (x[t] @ A[s][slot, :r].T) @ B[s][slot, :, :r].T
        returns (y, into) with y + into == x @ weight.T + bias + delta + into_before
        (into_before = 0 where into is None)

    The delta is added into ``into`` ([T, sum(out_s)], x's dtype, in place) when given.
    When None: under CUDA graph capture (or within :func:`overlapped`) into a new zero tensor,
    otherwise into y (None is returned: no zeroed buffer to write and read back). Captured,
    shrink and expand run on a side stream while the GEMM runs; the calling stream waits for
    both before anything queued after the return, so nothing of the LoRA is left between the
    GEMM and the caller's add. Either way the sums round alike (the expand rounds the delta
    to x's dtype before adding it), so eager and captured steps agree.
    """
    if not _branching(x, meta):  # one stream: into y when no into is given (no zeroed buffer)
        y = F.linear(x, weight, bias)
        add_lora(y if into is None else into, x, lora_a, lora_b, ranks, scales, meta)
        return y, into
    fresh = into is None
    if fresh:  # allocated on the calling stream: only it reuses the block
        into = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    side.wait_stream(main)  # x, into and the metadata are written on main
    with torch.cuda.stream(side):
        # Every branch starts with a small kernel before the shrink. Measured (docs/
        # benchmarks.md, fifth pass), the GEMM then takes the SMs first and the LoRA kernels
        # run in its gaps: a 7B decode step with 8 adapters 7.02 -> 6.81 ms (b32), 7.57 ->
        # 7.50 (b64) against branches that open with the shrink (whose many small programs
        # then delay the GEMM's start). A fresh buffer's head zeroes the rows of base-only
        # tokens and the expand stores the others (no fill of the whole buffer, no read of
        # it: twelfth pass); else a one-word fill.
        if fresh:
            zero_rows_without_lora(into, meta)
        else:
            head = _head_word(x.device)
            if head is not None:
                head.zero_()
        add_lora(into, x, lora_a, lora_b, ranks, scales, meta, store=fresh)
    if _triton_gemm_beside(x, weight):
        y = fused_linear_lora(x, weight, bias, None, None, None, None, None)
    else:
        y = F.linear(x, weight, bias)
    main.wait_stream(side)
    return y, into


def _triton_gemm_beside(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the branch's base GEMM is our skinny Triton GEMM (kernels.fused_linear_lora
    without a delta) rather than cuBLAS, by token count and output width: the GPU config's
    ``beside_triton_gemm_tokens``. Measured on the H100 in whole captured 7B decode steps
    with 8 adapters (docs/benchmarks.md, ninth and twelfth passes): beside cuBLAS's GEMMs
    the delta's kernels of the 4096-wide projections (o, down) ran partly after the GEMM, on
    the step's critical path, at every batch of 8-64 (ours: b32 7.69 -> 7.56 ms); the wide
    ones (qkv, gate/up) did better beside cuBLAS's below 48 tokens.
    LORASERVE_KERNELS_BESIDE_GEMM=triton (up to 64 tokens) or =cublas overrides it (A/B
    measurements)."""
    forced = os.environ.get("LORASERVE_KERNELS_BESIDE_GEMM")
    if forced == "cublas":
        return False
    t = x.shape[0]
    if forced == "triton":
        return t <= 64
    return triton_gemm_beside(beside_triton_gemm_tokens(x.device), t, weight.shape[0])
