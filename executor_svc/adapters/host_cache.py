"""LRU of parsed adapter weights in host memory, bounded by bytes.

The middle tier of the adapter hierarchy (disk cache -> host cache -> GPU slot, as in S-LoRA):
an adapter evicted from its GPU slot stays here, so bringing it back is one host-to-device copy
instead of a read and parse of safetensors. On CUDA the tensors are pinned, so that copy can be
asynchronous (``non_blocking``) and runs at full PCIe bandwidth.

Eviction is least-recently-used by ``get``/``put``. An adapter larger than the whole budget is
not cached (the caller still gets its weights). The cache never frees tensors a GPU slot or a
fusion build still uses: dropping an entry only drops this reference.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from executor_svc.adapters.refs import Key
from executor_svc.engine.types import AdapterWeights, LoraModuleWeights


def weights_nbytes(weights: AdapterWeights) -> int:
    return sum(
        m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
        for modules in weights.values()
        for m in modules.values()
    )


def pin_weights(weights: AdapterWeights) -> AdapterWeights:
    """Page-locked copies of every tensor (CUDA only; a no-op elsewhere)."""
    if not torch.cuda.is_available():
        return weights
    return {
        layer: {
            name: LoraModuleWeights(m.a.pin_memory(), m.b.pin_memory(), m.scale)
            for name, m in modules.items()
        }
        for layer, modules in weights.items()
    }


class HostCache:
    def __init__(self, budget_bytes: int, *, pin_memory: bool = True):
        self.budget_bytes = budget_bytes
        self._pin = pin_memory
        self._entries: OrderedDict[Key, tuple[AdapterWeights, int]] = OrderedDict()
        self.used_bytes = 0

    def get(self, key: Key) -> AdapterWeights | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def prepare(self, weights: AdapterWeights) -> AdapterWeights:
        """Pinned copies when pinning is on. Slow for big adapters: call it off the event loop."""
        return pin_weights(weights) if self._pin else weights

    def put(self, key: Key, weights: AdapterWeights) -> None:
        """Cache ``weights`` (already :meth:`prepare`-d), evicting LRU entries over budget."""
        self.pop(key)
        nbytes = weights_nbytes(weights)
        if nbytes > self.budget_bytes:
            return
        while self._entries and self.used_bytes + nbytes > self.budget_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.used_bytes -= freed
        self._entries[key] = (weights, nbytes)
        self.used_bytes += nbytes

    def pop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry[1]

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def entries(self) -> list[tuple[Key, int]]:
        """(key, bytes), least recently used first."""
        return [(key, nbytes) for key, (_, nbytes) in self._entries.items()]
