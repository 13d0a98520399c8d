"""A base projection and its LoRA delta with the delta's kernels beside the base GEMM.

The delta needs only x, not the base projection's output, so it need not wait for the GEMM:
captured into a CUDA graph, its kernels go on a side stream (a branch of the graph) and run
while the GEMM does. At decode sizes each LoRA kernel is a latency-bound launch of a few
microseconds; behind the GEMM on one stream they add their whole latency to every projection.

- :func:`linear_add_lora` returns ``y = x W^T + b + delta``: only the shrink can go beside the
  GEMM; the expand, which adds into y, follows it.
- :func:`linear_beside_lora` returns the base projection and adds the delta into another
  tensor (the residual stream, or a buffer the SiLU-and-mul adds in): shrink and expand both
  run beside the GEMM, and the consumer of the two joins them.

Eager calls run the three kernels in order on the current stream: a fork and a join cost host
time (two events), and eager steps are the host-bound ones (prefill), so the overlap would
slow them. :func:`overlapped` turns the branching on outside a capture, so that warm-ups
compile the variants a capture will launch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from kernels.add_lora_op import add_lora
from kernels.lora_expand_op import lora_expand
from kernels.lora_shrink_op import lora_shrink, shrink_buffer
from kernels.metadata import LoraBatchMeta

# LORASERVE_KERNELS_BRANCH=0 keeps every shrink on the calling stream (for A/B measurements).
ENABLED = os.environ.get("LORASERVE_KERNELS_BRANCH", "1") != "0"
_side_streams: dict[int, torch.cuda.Stream] = {}
_forced = False


@contextlib.contextmanager
def overlapped() -> Iterator[None]:
    """Within the block, :func:`linear_add_lora` branches eagerly too (as under capture)."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:  # high priority: its few programs go ahead of the GEMM's waiting ones
        stream = _side_streams[index] = torch.cuda.Stream(index, priority=-1)
    return stream


def _branching(x: torch.Tensor, meta: LoraBatchMeta) -> bool:
    """Whether the LoRA kernels go on the side stream: on CUDA, with work, when captured."""
    if not (ENABLED and x.is_cuda and meta.num_active > 0 and meta.grid_tiles > 0):
        return False
    return _forced or torch.cuda.is_current_stream_capturing()


def linear_add_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` plus the LoRA delta of :func:`kernels.add_lora`.

    Semantics:
        y = x @ weight.T + bias
        for t in range(num_tokens):
            for (slot, w) in plan[t]:
                for s in range(n_slices):
                    r = ranks[s, slot]
                    y[t, off_s:off_s + out_s] += (w * scales[s, slot]
                        * (x[t] @ A[s][slot, :r].T) @ B[s][slot, :, :r].T)

    Arguments as :func:`kernels.add_lora`'s; weight is [sum(out_s), in]. Returns a new y.
    Under CUDA graph capture (or within :func:`overlapped`) the shrink runs on a side stream
    while the GEMM runs; its buffer is allocated on the calling stream, which alone reuses it
    (after the join). The expand then reads y after waiting for the GEMM (``y_early=False``).
    """
    if not _branching(x, meta):
        y = F.linear(x, weight, bias)
        add_lora(y, x, lora_a, lora_b, ranks, scales, meta)
        return y
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    h = shrink_buffer(x, lora_a, meta)
    side.wait_stream(main)  # x (and the metadata) are written on main
    with torch.cuda.stream(side):
        lora_shrink(x, lora_a, ranks, meta, out=h)
    y = F.linear(x, weight, bias)
    main.wait_stream(side)
    lora_expand(y, h, lora_b, ranks, scales, meta, y_early=False)
    return y


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

    Where the delta lands depends on whether the call branches. Under CUDA graph capture (or
    within :func:`overlapped`) shrink and expand run on a side stream while the GEMM runs, and
    add the delta into ``into`` ([T, sum(out_s)], x's dtype; in place, or a new zero tensor
    when None); the calling stream waits for both before anything queued after the return,
    so nothing of the LoRA is left between the GEMM and the caller's add. Otherwise the delta
    goes into y, as :func:`kernels.add_lora` does (no zeroed buffer to write and read back),
    and ``into`` is returned as given, possibly None.
    """
    if not _branching(x, meta):  # one stream: the delta goes into y, as add_lora does
        y = F.linear(x, weight, bias)
        add_lora(y, x, lora_a, lora_b, ranks, scales, meta)
        return y, into
    fresh = into is None
    if fresh:  # allocated on the calling stream: only it reuses the block
        into = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    main = torch.cuda.current_stream(x.device)
    side = _side_stream(x.device)
    side.wait_stream(main)  # x, into and the metadata are written on main
    with torch.cuda.stream(side):
        if fresh:
            into.zero_()
        add_lora(into, x, lora_a, lora_b, ranks, scales, meta)
    y = F.linear(x, weight, bias)
    main.wait_stream(side)
    return y, into
