"""FUSION plans: several weighted adapters folded into one adapter that takes one GPU slot.

Method: rank concatenation, which makes the fused delta *exactly* the weighted sum of the
components' deltas. For every target module, with component i = (A_i [r_i, in], B_i [out, r_i],
scale s_i) and plan weight w_i:

    A = cat([A_1; A_2; ...], dim=0)                   # [sum r_i, in]
    B = cat([w_1 s_1 B_1, w_2 s_2 B_2, ...], dim=1)   # [out, sum r_i]
    scale = 1

    Semantics:
        (x @ A.T) @ B.T == sum_i w_i * s_i * (x @ A_i.T) @ B_i.T

Why not LoraRetriever's parameter averaging (A = sum w_i A_i, B = sum w_i B_i)? Its product
(sum w_i B_i)(sum w_j A_j) carries cross terms w_i w_j B_i A_j (i != j) that belong to no
adapter: it is neither component's behaviour nor their mixture, it needs equal ranks, and it
mixes adapters whose scales differ. Concatenation costs rank sum(r_i) instead of max(r_i), and is
the same math as a MIXTURE plan, but pays it once per step in one slot instead of k gathered
adapters per token; the two plans are therefore interchangeable for correctness, and fusion is
the cheaper one for many requests sharing one plan. A fused rank above the model's
``max_lora_rank`` is refused (INVALID_ARGUMENT) rather than approximated.

Based on: LoraRetriever (Zhao et al., 2024) for the fusion strategy; the exact-concatenation
construction is the standard block identity for sums of low-rank products.
"""

from __future__ import annotations

import torch

from executor_svc.engine.types import AdapterWeights, LoraModuleWeights
from executor_svc.errors import invalid
from loraserve.errors import FieldViolation


def fuse(components: list[tuple[AdapterWeights, float]], *, max_rank: int) -> AdapterWeights:
    """Fuse ``(weights, plan_weight)`` pairs into one adapter (see the module docstring).

    Components with weight 0 are skipped (they contribute nothing and would waste rank). The
    fused tensors take the dtype of the first component that targets the module.
    """
    grouped: dict[tuple[int, str], list[tuple[LoraModuleWeights, float]]] = {}
    for weights, w in components:
        if w == 0.0:
            continue
        for layer, modules in weights.items():
            for name, m in modules.items():
                grouped.setdefault((layer, name), []).append((m, w))
    fused: AdapterWeights = {}
    for (layer, name), parts in sorted(grouped.items()):
        rank = sum(m.a.shape[0] for m, _ in parts)
        if rank > max_rank:
            raise invalid(
                [
                    FieldViolation(
                        "plan.adapters",
                        f"fused rank of layer {layer} {name} is {rank} (sum of the components'"
                        f" ranks), above this executor's max_lora_rank {max_rank}; use MIXTURE"
                        " or fewer adapters",
                    )
                ]
            )
        dtype = parts[0][0].b.dtype
        a = torch.cat([m.a.to(dtype) for m, _ in parts], dim=0)
        # Scale in float32, then cast: w * s folded into B in bf16 would round twice.
        b = torch.cat([(m.b.float() * (w * m.scale)).to(dtype) for m, w in parts], dim=1)
        fused.setdefault(layer, {})[name] = LoraModuleWeights(a.contiguous(), b.contiguous(), 1.0)
    return fused
