"""Which adapters are where, as ``ResidentAdapter`` messages (ListResidentAdapters, GetStats).

GPU: every slot holding a loaded adapter (a slot still loading is not listed yet), with its
active request count and pin. HOST: adapters parsed in the host cache but in no slot; bringing
one back costs a host-to-device copy, no download or parse (what a router's placement uses).
"""

from __future__ import annotations

from executor_svc.adapters.host_cache import HostCache
from executor_svc.adapters.refs import Key
from executor_svc.adapters.slot_manager import SlotManager
from loraserve.api.v1 import executor_pb2


def resident_keys(slots: SlotManager, host: HostCache) -> list[Key]:
    keys: list[Key] = [s.key for s in slots.slots if s.key is not None]
    return keys + [k for k, _ in host.entries() if slots.slot_of(k) is None]


def resident_adapters(slots: SlotManager, host: HostCache) -> list[executor_pb2.ResidentAdapter]:
    """Adapters in GPU slots, then those only in the host cache."""
    out = []
    for slot in slots.slots:
        if slot.key is None or slot.loading:
            continue
        out.append(
            executor_pb2.ResidentAdapter(
                adapter_id=slot.key.adapter_id,
                version=slot.key.version,
                location=executor_pb2.ADAPTER_LOCATION_GPU,
                slot=slot.index,
                active_requests=slot.refcount,
                pinned=slot.pinned,
                size_bytes=slot.nbytes,
            )
        )
    for key, nbytes in host.entries():
        if slots.slot_of(key) is None:
            out.append(
                executor_pb2.ResidentAdapter(
                    adapter_id=key.adapter_id,
                    version=key.version,
                    location=executor_pb2.ADAPTER_LOCATION_HOST,
                    slot=-1,
                    size_bytes=nbytes,
                )
            )
    return out


def resident_one(slots: SlotManager, host: HostCache, key: Key) -> executor_pb2.ResidentAdapter:
    return next(
        r
        for r in resident_adapters(slots, host)
        if r.adapter_id == key.adapter_id and r.version == key.version
    )
