"""LoRA-aware linear layers: a (possibly fused) base projection plus slot-indexed adapters.

The contract follows vLLM's LoRA layers: the layer owns preallocated, slot-indexed adapter
buffers; ``set_lora(slot, ...)`` writes one slot in place, ``reset_lora(slot)`` empties it.
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
import torch.nn.functional as F
from torch import nn

from executor_svc.engine.types import LoraModuleWeights
from executor_svc.model.layers.lora_ops import apply_lora
from kernels import LoraBatchMeta


class LoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        names: list[str],
        *,
        bias: bool,
        num_slots: int,
        max_rank: int,
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
        self.num_slots, self.max_rank = num_slots, max_rank
        self.has_lora = num_slots > 0 and max_rank > 0
        n = len(out_sizes)
        if self.has_lora:
            # One tensor for all A slices: the kernels want equal shapes and strides.
            self.lora_a_all = torch.zeros(n, num_slots, max_rank, in_features, **kw)
            self.lora_a = list(self.lora_a_all.unbind(0))
            self.lora_b = [torch.zeros(num_slots, o, max_rank, **kw) for o in out_sizes]
            self.ranks = torch.zeros(n, num_slots, dtype=torch.int32, device=device)
            self.scales = torch.zeros(n, num_slots, dtype=torch.float32, device=device)

    def load_slice(self, name: str, tensor: torch.Tensor, kind: str = "weight") -> None:
        """Copy a checkpoint tensor (e.g. ``k_proj.weight``) into its rows of the fused param."""
        i = self.names.index(name)
        rows = slice(self.offsets[i], self.offsets[i] + self.out_sizes[i])
        target = self.weight if kind == "weight" else self.bias
        if target is None:
            raise ValueError(f"{name}: checkpoint has a bias the config does not declare")
        target.data[rows].copy_(tensor)

    def set_lora(self, slot: int, modules: dict[str, LoraModuleWeights]) -> None:
        """Write ``slot`` from this layer's entries of AdapterWeights (absent slice = rank 0)."""
        for s, name in enumerate(self.names):
            mw = modules.get(name)
            a, b = self.lora_a[s][slot], self.lora_b[s][slot]
            if mw is None:
                a.zero_()
                b.zero_()
                self.ranks[s, slot] = 0
                self.scales[s, slot] = 0.0
                continue
            r = mw.a.shape[0]
            if r > self.max_rank:
                raise ValueError(f"{name}: rank {r} exceeds max_lora_rank {self.max_rank}")
            if mw.a.shape != (r, self.in_features) or mw.b.shape != (self.out_sizes[s], r):
                raise ValueError(
                    f"{name}: A {tuple(mw.a.shape)} / B {tuple(mw.b.shape)} do not "
                    f"fit [r, {self.in_features}] / [{self.out_sizes[s]}, r]"
                )
            a[:r].copy_(mw.a, non_blocking=True)
            a[r:].zero_()
            b[:, :r].copy_(mw.b, non_blocking=True)
            b[:, r:].zero_()
            self.ranks[s, slot] = r
            self.scales[s, slot] = float(mw.scale)

    def reset_lora(self, slot: int) -> None:
        self.set_lora(slot, {})

    def lora_bytes_per_slot(self) -> int:
        if not self.has_lora:
            return 0
        el = self.lora_a_all.element_size()
        return el * self.max_rank * (len(self.names) * self.in_features + sum(self.out_sizes))

    def forward(self, x: torch.Tensor, lora: LoraBatchMeta | None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if lora is not None and self.has_lora:
            apply_lora(y, x, self.lora_a, self.lora_b, self.ranks, self.scales, lora)
        return y
