"""add_lora: the LoRA delta of one projection for a heterogeneous multi-LoRA batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.lora_expand_op import lora_expand
from kernels.lora_shrink_op import lora_shrink
from kernels.metadata import LoraBatchMeta


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
    *,
    shrink_config: dict | None = None,
    expand_config: dict | None = None,
    store: bool = False,
) -> None:
    """y += the LoRA delta of every token's weighted adapters, for every output slice (with
    ``store``, y = the delta on the rows of tokens with adapters, without reading y; the rows
    of base-only tokens are left as they are).

    Semantics:
        for t in range(num_tokens):
            for (slot, w) in plan[t]:              # 0..max_k adapters per token
                for s in range(n_slices):
                    r = ranks[s, slot]
                    y[t, off_s:off_s + out_s] += (w * scales[s, slot]
                        * (x[t] @ A[s][slot, :r].T) @ B[s][slot, :, :r].T)

    Two launches (shrink, expand), no host synchronisation, nothing allocated but the small
    fp32 intermediate (from PyTorch's caching allocator), so the call can be captured in a
    CUDA graph. Accumulation is fp32; the intermediate is rounded to the weights' dtype before
    the up-projection, as in PEFT.

    Args:
        y: [T, sum(out_s)] updated in place; slice s owns columns [off_s, off_s + out_s).
        x: [T, in]; x, y, A and B share one dtype (fp32, fp16 or bf16) and device.
        lora_a: one [slots, r_max, in] tensor per slice (same shape for every slice).
        lora_b: one [slots, out_s, r_max] tensor per slice.
        ranks: [n_slices, slots] int32, contiguous; rank of each slot per slice, 0 = empty,
            at most r_max.
        scales: [n_slices, slots] float32, contiguous.
        meta: from :func:`kernels.build_lora_meta` for this step, on the same device.
        shrink_config, expand_config: override the tuned launch parameters (for sweeps).
        store: see above (a fresh delta buffer: kernels.linear_beside_lora).
    """
    if len(lora_a) != len(lora_b):
        raise ValueError(f"{len(lora_a)} A slices but {len(lora_b)} B slices")
    if ranks.dtype != torch.int32 or scales.dtype != torch.float32 or not ranks.is_contiguous():
        raise ValueError("ranks must be contiguous int32 and scales float32")
    if x.shape[0] != meta.num_tokens or y.shape[0] != meta.num_tokens:
        raise ValueError(
            f"x has {x.shape[0]} and y {y.shape[0]} rows; meta has {meta.num_tokens} tokens"
        )
    if meta.num_active == 0:
        return
    h = lora_shrink(x, lora_a, ranks, meta, config=shrink_config)
    lora_expand(y, h, lora_b, ranks, scales, meta, config=expand_config, store=store)
