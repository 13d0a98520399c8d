"""LRU of parsed adapter weights in host memory, bounded by bytes.

The middle tier of the adapter hierarchy (disk cache -> host cache -> GPU slot, as in S-LoRA):
an adapter evicted from its GPU slot stays here, so bringing it back is one host-to-device copy
instead of a read and parse of safetensors. :meth:`HostCache.prepare` packs an adapter into ONE
buffer (page-locked with ``pin_memory``), module by module in checkpoint order (layer, then q,
k, v, o, gate, up, down; A then B): the slot layout of :mod:`executor_svc.model.lora_slots`,
so an adapter at the slots' full rank goes to its GPU slot in one host-to-device copy
(asynchronous on the step stream from page-locked memory, on a copy stream of its own from
pageable memory: ``CausalLM.set_lora``).

Eviction is least-recently-used by ``get``/``put``. An adapter larger than the whole budget is
not cached (the caller still gets its weights). The cache never frees tensors a GPU slot or a
fusion build still uses: dropping an entry only drops this reference.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from executor_svc.adapters.refs import Key
from executor_svc.engine.types import AdapterWeights, LoraModuleWeights
from executor_svc.model.lora_slots import back_to_back, slot_order


def weights_nbytes(weights: AdapterWeights) -> int:
    return sum(
        m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
        for modules in weights.values()
        for m in modules.values()
    )


def pack_weights(weights: AdapterWeights, *, pin: bool) -> AdapterWeights:
    """The same weights as views into one buffer (page-locked if ``pin``), in slot order.

    Weights of mixed dtypes are returned as they are (one buffer needs one dtype)."""
    mods = slot_order(weights)
    dtypes = {t.dtype for _, _, m in mods for t in (m.a, m.b)}
    if len(dtypes) != 1:
        return weights
    parts = [t.reshape(-1) for _, _, m in mods for t in (m.a, m.b)]
    flat = torch.empty(sum(t.numel() for t in parts), dtype=dtypes.pop(), pin_memory=pin)
    # One copy for the whole adapter: torch.cat releases the GIL once. Module by module (448
    # copies for a 7B adapter) each copy gave the GIL back and waited to retake it, beside the
    # engine's step thread that needs it to launch the next step.
    torch.cat(parts, out=flat)
    views = iter(torch.split(flat, [t.numel() for t in parts]))
    out: AdapterWeights = {}
    for layer, name, m in mods:
        a, b = next(views).view(m.a.shape), next(views).view(m.b.shape)
        out.setdefault(layer, {})[name] = LoraModuleWeights(a, b, m.scale)
    return out


def is_packed(weights: AdapterWeights, *, pin: bool) -> bool:
    """Whether ``weights`` already lie back to back in one host buffer in slot order, as
    :func:`pack_weights` leaves them (page-locked iff ``pin``)."""
    tensors = [t for _, _, m in slot_order(weights) for t in (m.a, m.b)]
    return back_to_back(tensors) and tensors[0].is_pinned() == pin


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

    @property
    def pin(self) -> bool:
        """Whether cached adapters are kept in page-locked memory."""
        return self._pin and torch.cuda.is_available()

    def prepare(self, weights: AdapterWeights) -> AdapterWeights:
        """``weights`` packed (and, when pinning is on, pinned): as they are if a packed
        read (``load_adapter(..., packed=True)``) made them so, else one packed copy. Call it
        off the event loop."""
        if is_packed(weights, pin=self.pin):
            return weights
        return pack_weights(weights, pin=self.pin)

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
