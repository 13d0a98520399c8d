"""The GPU adapter slots of a model: one contiguous region per slot, written in few copies.

Layout: ``data[num_slots, per_slot]`` in the model's dtype. A slot's region holds, layer by
layer and for each LoRA-aware projection (qkv, o, gate/up, down) slice by slice, ``A [r_max,
in]`` then ``B [out_s, r_max]``: the order a PEFT adapter lists its tensors in (q, k, v, o,
gate, up, down; A then B). Each :class:`LoRALinear` sees its slices as strided views
``[slots, r_max, in]`` / ``[slots, out_s, r_max]`` (the kernels take the slot stride), and its
ranks and scales as rows of model-wide ``[sites, 3, slots]`` tensors.

Running example (one layer, a qkv site only, in=4, out=(4, 2, 2), r_max=2)::

    slot region: qA[2x4] qB[4x2] kA[2x4] kB[2x2] vA[2x4] vB[2x2]  -> per_slot = 44
    lora_a[0] = data.as_strided((slots, 2, 4), (44, 4, 1), offset 0)    # q
    lora_b[1] = data.as_strided((slots, 2, 2), (44, 2, 1), offset 16)   # k

Why: written slice by slice, an adapter cost six small device operations per module (copy A,
copy B, zero both paddings, two scalar writes): ~7 ms for a 4.65 MB adapter, i.e. 0.7 GB/s
(docs/benchmarks.md, 2026-11-22). Now:

- an adapter whose host copy is one buffer in exactly this layout (every module present at
  rank r_max, in the model's dtype; the host cache packs adapters into one buffer) is written
  with ONE host-to-device copy;
- any other adapter: one memset of the region, then one copy per A and per B;
- ranks and scales: one copy each.

Nothing is written until the whole adapter has been checked, so a bad adapter leaves the slot
as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from executor_svc.engine.types import AdapterWeights, LoraModuleWeights

MAX_SLICES = 3
# Checkpoint module names in slot-layout order (within a layer); the host cache packs by it.
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_rank(name: str) -> tuple[int, str]:
    """Sort key of a module name in slot-layout order (names we do not serve last)."""
    return (MODULE_ORDER.index(name) if name in MODULE_ORDER else len(MODULE_ORDER), name)


def slot_order(weights: AdapterWeights) -> list[tuple[int, str, LoraModuleWeights]]:
    """``(layer, name, module)`` of every module of ``weights``, in slot-layout order."""
    return [
        (layer, name, weights[layer][name])
        for layer in sorted(weights)
        for name in sorted(weights[layer], key=module_rank)
    ]


def back_to_back(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether host tensors of one dtype, each contiguous, follow one another in memory with no
    gap (one buffer: what a single host-to-device copy can move)."""
    end, dtype = None, None
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            return False
        if end is not None and (t.data_ptr() != end or t.dtype != dtype):
            return False
        end, dtype = t.data_ptr() + t.numel() * t.element_size(), t.dtype
    return end is not None


@dataclass(frozen=True, slots=True)
class LoraSite:
    """One LoRA-aware projection: its layer, input size and output slices (checkpoint names)."""

    layer: int
    in_features: int
    names: tuple[str, ...]
    out_sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SiteViews:
    lora_a: list[torch.Tensor]  # per slice [slots, r_max, in]
    lora_b: list[torch.Tensor]  # per slice [slots, out_s, r_max]
    ranks: torch.Tensor  # [n_slices, slots] int32, contiguous
    scales: torch.Tensor  # [n_slices, slots] float32, contiguous


class LoraSlotStore:
    def __init__(
        self,
        sites: list[LoraSite],
        *,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.sites, self.num_slots, self.max_rank = sites, num_slots, max_rank
        self.dtype, self.device = dtype, device
        r = max_rank
        # (A offset, B offset) per slice of each site, in elements within a slot's region.
        self._offsets: list[list[tuple[int, int]]] = []
        off = 0
        for site in sites:
            per = []
            for out in site.out_sizes:
                per.append((off, off + r * site.in_features))
                off += r * site.in_features + out * r
            self._offsets.append(per)
        self.per_slot = off
        self.data = torch.zeros(num_slots, off, dtype=dtype, device=device)
        self.ranks = torch.zeros(
            len(sites), MAX_SLICES, num_slots, dtype=torch.int32, device=device
        )
        self.scales = torch.zeros(len(sites), MAX_SLICES, num_slots, device=device)
        # Host copies of ranks and scales: folding a slot into the base weights
        # (executor_svc.model.lora_merge) reads them without a device synchronisation.
        self.host_ranks = torch.zeros(len(sites), MAX_SLICES, num_slots, dtype=torch.int32)
        self.host_scales = torch.zeros(len(sites), MAX_SLICES, num_slots)

    @property
    def bytes_per_slot(self) -> int:
        return self.per_slot * self.data.element_size()

    def views(self, site: int) -> SiteViews:
        s, r, n = self.sites[site], self.max_rank, len(self.sites[site].names)
        a = [
            self.data.as_strided(
                (self.num_slots, r, s.in_features), (self.per_slot, s.in_features, 1), ao
            )
            for ao, _ in self._offsets[site]
        ]
        b = [
            self.data.as_strided((self.num_slots, out, r), (self.per_slot, r, 1), bo)
            for (_, bo), out in zip(self._offsets[site], s.out_sizes, strict=True)
        ]
        return SiteViews(a, b, self.ranks[site, :n], self.scales[site, :n])

    # -- writing a slot (between steps: the caller holds the model's step lock) ---------------
    # Every copy is asynchronous, from page-locked memory: the step lock is held only while a
    # step is queued, so a copy that waited for the device (as one from pageable memory does)
    # would hold the lock until the running step ends and stall the queuing of the next one.

    def write(self, slot: int, weights: AdapterWeights) -> None:
        """Put ``weights`` in ``slot``; modules the adapter lacks get rank 0."""
        modules = self.check(weights)
        ranks = torch.zeros(len(self.sites), MAX_SLICES, dtype=torch.int32)
        scales = torch.zeros(len(self.sites), MAX_SLICES)
        for (i, j), mw in modules.items():
            ranks[i, j], scales[i, j] = mw.a.shape[0], float(mw.scale)
        flat = self._flat_source(modules)
        if flat is not None:
            self.data[slot].copy_(flat, non_blocking=True)
        else:
            self.data[slot].zero_()
            for (i, j), mw in modules.items():
                v, r = self._slice_views(slot, i, j), mw.a.shape[0]
                v[0][:r].copy_(mw.a, non_blocking=True)
                v[1][:, :r].copy_(mw.b, non_blocking=True)
        self.host_ranks[:, :, slot], self.host_scales[:, :, slot] = ranks, scales
        if self.data.is_cuda:  # from pageable memory a copy would wait for the running step
            ranks, scales = ranks.pin_memory(), scales.pin_memory()
        self.ranks[:, :, slot].copy_(ranks, non_blocking=True)
        self.scales[:, :, slot].copy_(scales, non_blocking=True)

    def clear(self, slot: int) -> None:
        self.data[slot].zero_()
        self.ranks[:, :, slot] = 0
        self.scales[:, :, slot] = 0.0
        self.host_ranks[:, :, slot], self.host_scales[:, :, slot] = 0, 0.0

    def slice_weights(self, slot: int, site: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice ``j`` of ``site`` in ``slot``, cut to its rank: ``(A [r, in], B [out, r])``."""
        r = int(self.host_ranks[site, j, slot])
        a, b = self._slice_views(slot, site, j)
        return a[:r], b[:, :r]

    def _slice_views(self, slot: int, site: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, r = self.sites[site], self.max_rank
        ao, bo = self._offsets[site][j]
        region = self.data[slot]
        a = region[ao : ao + r * s.in_features].view(r, s.in_features)
        b = region[bo : bo + s.out_sizes[j] * r].view(s.out_sizes[j], r)
        return a, b

    def check(self, weights: AdapterWeights) -> dict[tuple[int, int], LoraModuleWeights]:
        """Every module of ``weights`` by (site, slice), in slot-layout order; or ValueError."""
        where = {
            (s.layer, name): (i, j)
            for i, s in enumerate(self.sites)
            for j, name in enumerate(s.names)
        }
        found = {}
        for layer, mods in weights.items():
            for name, mw in mods.items():
                key = where.get((layer, name))
                if key is None:
                    raise ValueError(
                        f"adapter has modules/layers the model lacks: layer {layer} {name}"
                    )
                site = self.sites[key[0]]
                r, out = mw.a.shape[0], site.out_sizes[key[1]]
                if r > self.max_rank:
                    raise ValueError(f"{name}: rank {r} exceeds max_lora_rank {self.max_rank}")
                if mw.a.shape != (r, site.in_features) or mw.b.shape != (out, r):
                    raise ValueError(
                        f"{name}: A {tuple(mw.a.shape)} / B {tuple(mw.b.shape)} do not "
                        f"fit [r, {site.in_features}] / [{out}, r]"
                    )
                found[key] = mw
        return dict(sorted(found.items()))

    def _flat_source(
        self, modules: dict[tuple[int, int], LoraModuleWeights]
    ) -> torch.Tensor | None:
        """The adapter's host buffer as one [per_slot] tensor, when it is laid out like a slot."""
        if len(modules) != sum(len(s.names) for s in self.sites):
            return None
        if any(mw.a.shape[0] != self.max_rank for mw in modules.values()):
            return None
        first = next(iter(modules.values())).a
        tensors = [t for mw in modules.values() for t in (mw.a, mw.b)]
        if first.dtype != self.dtype or not back_to_back(tensors):
            return None
        out = torch.empty(0, dtype=self.dtype)
        return out.set_(first.untyped_storage(), first.storage_offset(), (self.per_slot,))
