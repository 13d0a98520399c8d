"""LoRA-aware linear layers: a (possibly fused) base projection plus slot-indexed adapters.

The layer reads slot-indexed adapter buffers that are views into the model's
:class:`~executor_svc.model.lora_slots.LoraSlotStore` (which writes slots: ``CausalLM.set_lora``).
The layer never knows where weights came from (registry, host cache, fusion); the serving
layer decides which slot holds what. Buffers are written in place, so CUDA graphs captured
over the layer stay valid across slot changes.

A fused layer (qkv, gate/up) holds one base weight [sum(out_s), in] and per slice s:
``lora_a[s]: [slots, r_max, in]``, ``lora_b[s]: [slots, out_s, r_max]``, plus
``ranks[s, slot]`` and ``scales[s, slot]`` (the kernels' multi-slice layout: slice s writes
columns [sum(out_<s), sum(out_<=s))).
"""

from __future__ import annotations

import torch
from torch import nn

from executor_svc.model.layers.lora_ops import base_linear, linear_beside_delta, linear_with_lora
from executor_svc.model.lora_slots import SiteViews
from kernels import LoraBatchMeta


class LoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        names: list[str],
        *,
        bias: bool,
        slots: SiteViews | None,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.in_features, self.out_sizes, self.names = in_features, out_sizes, names
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(
            torch.empty(sum(out_sizes), in_features, **kw), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(sum(out_sizes), **kw), requires_grad=False) if bias else None
        )
        self.slots = slots

    def load_slice(self, name: str, tensor: torch.Tensor, kind: str = "weight") -> None:
        """Copy a checkpoint tensor (e.g. ``k_proj.weight``) into its rows of the fused param."""
        i = self.names.index(name)
        rows = slice(self.offsets[i], self.offsets[i] + self.out_sizes[i])
        target = self.weight if kind == "weight" else self.bias
        if target is None:
            raise ValueError(f"{name}: checkpoint has a bias the config does not declare")
        target.data[rows].copy_(tensor)

    def forward(self, x: torch.Tensor, lora: LoraBatchMeta | None) -> torch.Tensor:
        v = self.slots
        if lora is None or v is None:
            return base_linear(x, self.weight, self.bias)
        return linear_with_lora(
            x, self.weight, self.bias, v.lora_a, v.lora_b, v.ranks, v.scales, lora
        )

    def forward_beside(
        self, x: torch.Tensor, lora: LoraBatchMeta | None, into: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(y, into)`` for a consumer that adds the two (a residual add, the SiLU-and-mul):
        their sum is x W^T + b plus the LoRA delta (plus ``into``). The delta goes into
        ``into`` (in place) when given; when None, into y (None comes back) or, in a captured
        step, into a new buffer, its kernels then running beside the GEMM. At decode sizes on
        a GPU that prefers it, the delta is in y (one fused kernel) and ``into`` untouched."""
        v = self.slots
        if lora is None or v is None:
            return base_linear(x, self.weight, self.bias), into
        return linear_beside_delta(
            x, self.weight, self.bias, v.lora_a, v.lora_b, v.ranks, v.scales, lora, into
        )
