"""Folding one adapter slot into the base weights (dLoRA's merged mode) and back out.

Semantics, for every LoRA-aware projection (site ``i``, :class:`LoRALinear` ``proj``) and each
of its slices ``j`` (q/k/v of a fused qkv, gate/up of a fused gate/up)::

    rows = proj.weight[off_j : off_j + out_j]
    rows = round(rows + sign * scale[i, j, slot] * B_j[slot, :, :r] @ A_j[slot, :r])

with the product and the sum in fp32 and one rounding to the model's dtype. ``sign=+1`` folds
the adapter in at weight 1 (merge), ``sign=-1`` takes it out (unmerge). The product is computed
the same way both times (same inputs, same kernel; only ``add``'s sign differs), so a round
trip is ``round(round(W + d) - d)``: exactly W wherever ``W + d`` stays in W's binade (the
rounding error of the merge, at most half a unit in the last place, is undone by the second
rounding), which is almost every element of a trained adapter's projection; elsewhere (``d``
large against a small W) it is off by at most half a unit in the last place of ``W + d``.
tests/executor/test_lora_merge.py measures both over repeated round trips.

Rows are done in chunks so the fp32 temporaries stay near ``CHUNK_ELEMENTS`` (64 MB), not the
size of a 7B projection (22,016 x 4,096 for gate/up: 360 MB in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from executor_svc.model.layers.lora_linear import LoRALinear
from executor_svc.model.lora_slots import LoraSlotStore

CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def fold_slot(
    store: LoraSlotStore, projections: Sequence[LoRALinear], slot: int, sign: int
) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) ``slot``'s delta to every base projection.

    ``projections[i]`` is the layer of the store's site ``i``. Call between steps (under the
    model's step lock): the weights change in place, so captured CUDA graphs stay valid."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be 1 or -1, not {sign}")
    for i, proj in enumerate(projections):
        for j, off in enumerate(proj.offsets):
            a, b = store.slice_weights(slot, i, j)
            scale = float(store.host_scales[i, j, slot])
            if a.shape[0] == 0 or scale == 0.0:
                continue  # the adapter lacks this module
            _fold_rows(proj.weight.data[off : off + b.shape[0]], a.float(), b.float(), scale, sign)


def _fold_rows(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, sign: int):
    step = max(1, CHUNK_ELEMENTS // w.shape[1])
    for r0 in range(0, w.shape[0], step):
        rows = w[r0 : r0 + step]
        delta = torch.mm(b[r0 : r0 + step] * scale, a)
        if rows.dtype == torch.float32:
            rows.add_(delta, alpha=sign)
        else:
            rows.copy_(rows.float().add_(delta, alpha=sign))
