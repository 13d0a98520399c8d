"""Plain-torch references for every op in :mod:`kernels` (written before the kernels).

They are the specification the Triton kernels are tested against: slow, obvious loops over
tokens and adapters, accumulating in float32 (float64 when the inputs are float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.metadata import LoraBatchMeta


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _host_plan(meta: LoraBatchMeta) -> tuple[list[list[int]], list[list[float]]]:
    return meta.token_slots.cpu().tolist(), meta.token_weights.cpu().tolist()


def lora_shrink_ref(
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    meta: LoraBatchMeta,
) -> torch.Tensor:
    """Reference shrink: project every (token, adapter) pair down to the adapter's rank.

    Semantics:
        for s in range(n_slices):
            for t in range(num_tokens):
                for k in range(max_k):
                    slot = token_slots[t, k]
                    if slot >= 0:
                        r = ranks[s, slot]
                        h[s, t, k, :r] = x[t] @ A[s][slot, :r].T

    Args:
        x: [T, in] fp32/fp16/bf16.
        lora_a: one [slots, r_max, in] tensor per slice, same dtype as x.
        ranks: [n_slices, slots] int32, 0 = empty slot.
        meta: the step's :class:`LoraBatchMeta`.

    Returns:
        h: [n_slices, T, max_k, r_max] float32; entries for r >= rank or slot == -1 are 0.
    """
    r_max = lora_a[0].shape[1]
    acc = _acc_dtype(x.dtype)
    h = torch.zeros(len(lora_a), x.shape[0], meta.max_k, r_max, dtype=acc)
    slots, _ = _host_plan(meta)
    rk = ranks.cpu().tolist()
    for s, a in enumerate(lora_a):
        for t, row in enumerate(slots):
            for k, slot in enumerate(row):
                if slot < 0 or rk[s][slot] == 0:
                    continue
                r = rk[s][slot]
                h[s, t, k, :r] = x[t].cpu().to(acc) @ a[slot, :r].cpu().to(acc).T
    return h


def lora_expand_ref(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
) -> None:
    """Reference expand: y += the weighted, scaled up-projection of every pair (in place).

    Semantics:
        for s in range(n_slices):
            for t in range(num_tokens):
                for k in range(max_k):
                    slot = token_slots[t, k]
                    if slot >= 0:
                        r = ranks[s, slot]
                        y[t, off_s:off_s + out_s] += (token_weights[t, k] * scales[s, slot]
                                                      * h[s, t, k, :r] @ B[s][slot, :, :r].T)

    Args:
        y: [T, sum(out_s)], updated in place (one rounding to y.dtype at the end).
        h: [n_slices, T, max_k, r_max] float32, as returned by :func:`lora_shrink_ref`.
        lora_b: one [slots, out_s, r_max] tensor per slice.
        ranks: [n_slices, slots] int32.
        scales: [n_slices, slots] float32.
        meta: the step's :class:`LoraBatchMeta`.
    """
    acc = _acc_dtype(y.dtype)
    delta = torch.zeros(y.shape, dtype=acc)
    slots, weights = _host_plan(meta)
    rk, sc = ranks.cpu().tolist(), scales.cpu().tolist()
    off = 0
    for s, b in enumerate(lora_b):
        out_s = b.shape[1]
        for t, row in enumerate(slots):
            for k, slot in enumerate(row):
                if slot < 0 or rk[s][slot] == 0:
                    continue
                r = rk[s][slot]
                coef = weights[t][k] * sc[s][slot]
                delta[t, off : off + out_s] += coef * (
                    h[s, t, k, :r].to(acc) @ b[slot, :, :r].cpu().to(acc).T
                )
        off += out_s
    y.copy_((y.cpu().to(acc) + delta).to(y.dtype).to(y.device))


def add_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
) -> None:
    """Reference for :func:`kernels.add_lora`: shrink then expand, y updated in place.

    Semantics:
        for t in range(num_tokens):
            for (slot, w) in plan[t]:              # 0..max_k adapters per token
                for s in range(n_slices):
                    r = ranks[s, slot]
                    y[t, off_s:off_s + out_s] += (w * scales[s, slot]
                        * (x[t] @ A[s][slot, :r].T) @ B[s][slot, :, :r].T)

    Args: as :func:`kernels.add_lora`.
    """
    if meta.num_tokens == 0:
        return
    h = lora_shrink_ref(x, lora_a, ranks, meta)
    lora_expand_ref(y, h, lora_b, ranks, scales, meta)
