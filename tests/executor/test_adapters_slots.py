"""Slot manager, store and host cache over the real model (CausalLM slots) and PEFT adapters.

No engine here: these exercise "where adapters enter GPU memory" directly on the model's
slot-indexed buffers (CPU), with the real PEFT loader and a real local adapter source.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from executor_svc.adapters.host_cache import HostCache, weights_nbytes
from executor_svc.adapters.local_source import LocalDirSource
from executor_svc.adapters.refs import AdapterKey, FusionKey
from executor_svc.adapters.slot_manager import SlotManager
from executor_svc.adapters.store import AdapterStore
from executor_svc.model.loader import build_model, load_hf_config
from executor_svc.model.lora_loader import load_adapter
from loraserve.errors import FailedPrecondition, NotFound, ResourceExhausted


class CountingLoader:
    """The real PEFT loader, counting calls (and the most running at once), optionally slowed
    down for one adapter (or, with slow="*", for every adapter)."""

    def __init__(self, slow: str = "", delay: float = 0.0):
        self.calls: dict[str, int] = {}
        self.slow, self.delay = slow, delay
        self.lock = threading.Lock()
        self.running = self.most_running = 0
        self.events: list[str] = []  # "start" / "end" of each call, in order

    def __call__(self, path: Path):
        with self.lock:
            self.calls[path.name] = self.calls.get(path.name, 0) + 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.events.append("start")
        try:
            if self.slow in (path.name, "*"):
                time.sleep(self.delay)
            return load_adapter(path)
        finally:
            with self.lock:
                self.running -= 1
                self.events.append("end")


@pytest.fixture
def adapter_root(adapter_factory, tmp_path) -> Path:
    for i, name in enumerate(["a", "b", "c", "d"]):
        adapter_factory(name, rank=4, seed=i + 1)
    return tmp_path / "adapters"


def make(tiny_model_dir, root, *, slots=2, loader=None, wait=0.3, host_bytes=1 << 30, builds=4):
    model = build_model(
        load_hf_config(tiny_model_dir),
        device=torch.device("cpu"),
        dtype=torch.float32,
        num_slots=slots,
        max_rank=16,
    )
    store = AdapterStore(
        LocalDirSource(root),
        HostCache(host_bytes),
        loader or CountingLoader(),
        max_rank=16,
        max_concurrent_builds=builds,
    )
    return model, store, SlotManager(model, store, slots, wait_timeout_s=wait, retry_after_s=0.5)


def K(name: str) -> AdapterKey:
    return AdapterKey(name, 1)


def slot_rank(model, slot: int) -> int:
    return int(model.layers[0].qkv_proj.slots.ranks[0, slot])


async def test_acquire_loads_into_slot_and_release_keeps_it_resident(tiny_model_dir, adapter_root):
    model, store, slots = make(tiny_model_dir, adapter_root)
    lease = await slots.acquire([K("a")])
    (idx,) = lease.indices
    assert slot_rank(model, idx) == 4
    want = load_adapter(adapter_root / "a")[0]["q_proj"]
    assert torch.equal(model.layers[0].qkv_proj.slots.lora_a[0][idx, :4], want.a)
    assert slots.slot_of(K("a")).refcount == 1
    lease.release()
    lease.release()  # idempotent
    assert slots.slot_of(K("a")).refcount == 0
    assert slots.slot_of(K("a")).key == K("a")  # still resident, evictable


async def test_concurrent_requests_for_a_cold_adapter_share_one_load(tiny_model_dir, adapter_root):
    loader = CountingLoader(slow="a", delay=0.2)
    _, _, slots = make(tiny_model_dir, adapter_root, loader=loader)
    leases = await asyncio.gather(*(slots.acquire([K("a")]) for _ in range(20)))
    assert loader.calls == {"a": 1}
    assert {tuple(le.indices) for le in leases} == {tuple(leases[0].indices)}
    assert slots.slot_of(K("a")).refcount == 20
    for le in leases:
        le.release()
    assert slots.slot_of(K("a")).refcount == 0


async def test_lru_eviction_picks_least_recently_used_idle_slot(tiny_model_dir, adapter_root):
    _, store, slots = make(tiny_model_dir, adapter_root)
    (await slots.acquire([K("a")])).release()
    (await slots.acquire([K("b")])).release()
    (await slots.acquire([K("a")])).release()  # a is now more recent than b
    lease = await slots.acquire([K("c")])
    assert slots.slot_of(K("b")) is None  # b evicted from the GPU ...
    assert K("b") in store.host_cache  # ... but still in the host cache
    assert slots.slot_of(K("a")) is not None
    lease.release()


async def test_slot_in_use_is_never_evicted_and_full_pool_is_exhausted(
    tiny_model_dir, adapter_root
):
    _, _, slots = make(tiny_model_dir, adapter_root, wait=0.2)
    la, lb = await slots.acquire([K("a")]), await slots.acquire([K("b")])
    with pytest.raises(ResourceExhausted) as info:
        await slots.acquire([K("c")])
    assert info.value.retry_after_s == 0.5
    assert slots.slot_of(K("a")).refcount == 1 and slots.slot_of(K("b")).refcount == 1
    # A waiter gets the slot as soon as a running request releases one.
    waiter = asyncio.ensure_future(slots.acquire([K("c")], timeout=5))
    await asyncio.sleep(0.05)
    assert slots.waiting == 1
    la.release()
    lc = await waiter
    assert slots.slot_of(K("a")) is None and slots.slot_of(K("c")) is not None
    lb.release()
    lc.release()
    assert slots.waiting == 0


async def test_newcomer_does_not_overtake_a_waiting_request(tiny_model_dir, adapter_root):
    _, _, slots = make(tiny_model_dir, adapter_root, wait=0.3)
    la, lb = await slots.acquire([K("a")]), await slots.acquire([K("b")])
    older = asyncio.ensure_future(slots.acquire([K("c")], timeout=5))
    await asyncio.sleep(0.02)
    la.release()  # frees one slot; "older" has waited for it
    newer = asyncio.ensure_future(slots.acquire([K("d")], timeout=0.3))
    lc = await older
    with pytest.raises(ResourceExhausted):
        await newer
    resident_again = await slots.acquire([K("b")])  # resident adapters never queue
    for lease in (lb, lc, resident_again):
        lease.release()
    assert slots.waiting == 0


async def test_pinned_slot_is_never_evicted(tiny_model_dir, adapter_root):
    _, _, slots = make(tiny_model_dir, adapter_root, wait=0.1)
    (await slots.acquire([K("a")], pin=True)).release()
    (await slots.acquire([K("b")])).release()
    (await slots.acquire([K("c")])).release()  # must evict b, not the older pinned a
    assert slots.slot_of(K("a")) is not None and slots.slot_of(K("b")) is None
    lc = await slots.acquire([K("c")])
    with pytest.raises(ResourceExhausted):
        await slots.acquire([K("d")])
    lc.release()
    assert slots.unload(K("a"))  # unpins and evicts
    assert slots.slot_of(K("a")) is None


async def test_loading_adapter_does_not_hold_back_requests_for_resident_ones(
    tiny_model_dir, adapter_root
):
    loader = CountingLoader(slow="b", delay=0.5)
    _, _, slots = make(tiny_model_dir, adapter_root, loader=loader)
    (await slots.acquire([K("a")])).release()
    slow = asyncio.ensure_future(slots.acquire([K("b")]))
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    fast = await slots.acquire([K("a")])
    assert time.perf_counter() - t0 < 0.1
    assert not slow.done()
    fast.release()
    (await slow).release()


async def test_cancelled_waiter_releases_and_shared_load_still_completes(
    tiny_model_dir, adapter_root
):
    loader = CountingLoader(slow="a", delay=0.3)
    _, _, slots = make(tiny_model_dir, adapter_root, loader=loader)
    task = asyncio.ensure_future(slots.acquire([K("a")]))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slots.slot_of(K("a")).refcount == 0
    lease = await slots.acquire([K("a")])  # the load went on; no second parse
    assert loader.calls == {"a": 1}
    lease.release()


async def test_mixture_lease_reserves_all_slots_at_once(tiny_model_dir, adapter_root):
    _, _, slots = make(tiny_model_dir, adapter_root, slots=3)
    lease = await slots.acquire([K("a"), K("b"), K("c")])
    assert sorted(lease.indices) == [0, 1, 2]
    lease.release()
    with pytest.raises(Exception) as info:  # more distinct adapters than slots: never fits
        await slots.acquire([K("a"), K("b"), K("c"), K("d")])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_and_broken_adapters_fail_every_waiter_and_free_the_slot(
    tiny_model_dir, adapter_root
):
    _, store, slots = make(tiny_model_dir, adapter_root)
    with pytest.raises(NotFound):
        await store.resolve("nope", 0)
    (adapter_root / "d" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    results = await asyncio.gather(
        *(slots.acquire([K("d")]) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, FailedPrecondition) for r in results), results
    assert slots.slot_of(K("d")) is None
    assert slots.num_free == 2


async def test_host_cache_is_lru_within_its_byte_budget(tiny_model_dir, adapter_root):
    one = weights_nbytes(load_adapter(adapter_root / "a"))
    cache = HostCache(2 * one + 10, pin_memory=False)
    for name in "abc":
        cache.put(K(name), load_adapter(adapter_root / name))
    assert [k.adapter_id for k, _ in cache.entries()] == ["b", "c"]
    cache.get(K("b"))
    cache.put(K("a"), load_adapter(adapter_root / "a"))
    assert [k.adapter_id for k, _ in cache.entries()] == ["b", "a"]
    assert cache.used_bytes == 2 * one
    HostCache(one - 1).put(K("a"), load_adapter(adapter_root / "a"))  # too big: not kept


async def test_fusion_key_is_built_once_and_occupies_one_slot(tiny_model_dir, adapter_root):
    loader = CountingLoader()
    model, store, slots = make(tiny_model_dir, adapter_root, loader=loader)
    fused = FusionKey(((K("a"), 0.25), (K("b"), 0.75)))
    leases = await asyncio.gather(*(slots.acquire([fused]) for _ in range(5)))
    assert len({tuple(le.indices) for le in leases}) == 1
    assert loader.calls == {"a": 1, "b": 1}
    assert slot_rank(model, leases[0].indices[0]) == 8  # ranks concatenated: 4 + 4
    for le in leases:
        le.release()
    assert (
        fused.adapter_id.startswith("fusion-")
        and fused.adapter_id == FusionKey(((K("a"), 0.25), (K("b"), 0.75))).adapter_id
    )


async def test_two_slots_freed_at_once_serve_a_waiter_and_a_newcomer(tiny_model_dir, adapter_root):
    _, _, slots = make(tiny_model_dir, adapter_root, slots=2, wait=2.0)
    mix = await slots.acquire([K("a"), K("b")])  # one release will free both slots
    w1 = asyncio.ensure_future(slots.acquire([K("c")]))
    await asyncio.sleep(0.02)
    (await slots.acquire([K("a")])).release()  # resident: goes ahead of the queue
    t0 = time.perf_counter()
    mix.release()
    # Arrives after the wake-up went out but before w1 ran: it queues behind w1, and must be
    # woken again once w1 took its slot (the second slot is free), not at its timeout.
    w3 = asyncio.ensure_future(slots.acquire([K("d")]))
    l1, l3 = await w1, await w3
    assert time.perf_counter() - t0 < 0.5
    l1.release()
    l3.release()


async def test_a_burst_of_cold_adapters_is_parsed_a_few_at_a_time(tiny_model_dir, adapter_root):
    """Four cold adapters at once through a store that builds two at a time: every load
    completes, two parse at once and never more, and the third starts only once a first one
    has finished (waves, not four sharing the cores and finishing together)."""
    loader = CountingLoader(slow="*", delay=0.2)
    _, store, _ = make(tiny_model_dir, adapter_root, loader=loader, builds=2)
    await asyncio.gather(*(store.weights(K(n)) for n in "abcd"))
    assert sorted(loader.calls) == list("abcd") and loader.most_running == 2
    starts = [i for i, e in enumerate(loader.events) if e == "start"]
    assert starts[2] > loader.events.index("end"), loader.events


def test_store_refuses_a_build_limit_below_one(adapter_root) -> None:
    with pytest.raises(ValueError, match="max_concurrent_builds"):
        AdapterStore(
            LocalDirSource(adapter_root),
            HostCache(1 << 20),
            CountingLoader(),
            max_rank=16,
            max_concurrent_builds=0,
        )
