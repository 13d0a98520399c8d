"""From a key to host tensors: resolve versions, fetch files, parse, fuse; cached and shared.

``AdapterStore.weights(key)`` is what the slot manager calls to get an adapter's host-side
``AdapterWeights`` before copying them into a slot:

    host cache hit  -> cached tensors
    AdapterKey      -> source.fetch (disk cache / download) -> load_fn (safetensors -> tensors,
                       in a worker thread: parsing must not stall the event loop) -> host cache
    FusionKey       -> weights of every component (same path) -> fusion.fuse -> host cache

Concurrent calls for the same key share one in-flight task, so 50 requests arriving together
for a cold adapter cause one download and one parse. Failures are not cached: the next call
tries again. At most ``max_concurrent_builds`` adapters are parsed and packed at once
(downloads are not limited). How many is best depends on the host, measured with bursts of
cold 7B adapters (docs/benchmarks.md): on 2 CPU cores, 24 at once, 4 at a time brought the last
one in 3x sooner than all together (the loads stop thrashing); on the H100 host (16 cores), 64
at once, 4 at a time was slower than 64 (last request started after 10.5 s vs 5.5-6.7 s): the
trickle of loads then overlapped prefill steps and both fought the step thread for the GIL.
Default: 64.

``resolve(adapter_id, version)`` turns version 0 ("latest READY") into a number. Concrete
versions are immutable and cached for good; "latest" answers are cached for
``latest_ttl_s`` so a hot adapter does not cost a registry round trip per request, while a newly
READY version is picked up within that time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from executor_svc.adapters.fusion import fuse
from executor_svc.adapters.host_cache import HostCache
from executor_svc.adapters.refs import AdapterKey, AdapterSource, FusionKey, Key, ResolvedAdapter
from executor_svc.engine.types import AdapterWeights
from executor_svc.errors import adapter_incompatible

LoadFn = Callable[[Path], AdapterWeights]


class AdapterStore:
    def __init__(
        self,
        source: AdapterSource,
        host_cache: HostCache,
        load_fn: LoadFn,
        *,
        max_rank: int,
        latest_ttl_s: float = 5.0,
        max_concurrent_builds: int = 64,
    ):
        if max_concurrent_builds < 1:
            raise ValueError(f"max_concurrent_builds={max_concurrent_builds} must be >= 1")
        self.source = source
        self.host_cache = host_cache
        self._load_fn = load_fn
        self._max_rank = max_rank
        self._latest_ttl_s = latest_ttl_s
        self._resolved: dict[AdapterKey, ResolvedAdapter] = {}
        self._latest: dict[str, tuple[float, ResolvedAdapter]] = {}
        self._inflight: dict[Key, asyncio.Future[AdapterWeights]] = {}
        self._max_builds = max_concurrent_builds
        self._build_slots: asyncio.Semaphore | None = None  # made on the serving loop

    async def resolve(self, adapter_id: str, version: int) -> ResolvedAdapter:
        if version:
            hit = self._resolved.get(AdapterKey(adapter_id, version))
        else:
            cached = self._latest.get(adapter_id)
            hit = (
                cached[1] if cached and time.monotonic() - cached[0] < self._latest_ttl_s else None
            )
        if hit is not None:
            return hit
        resolved = await self.source.resolve(adapter_id, version)
        self._resolved[resolved.key] = resolved
        if not version:
            self._latest[adapter_id] = (time.monotonic(), resolved)
        return resolved

    async def weights(self, key: Key) -> AdapterWeights:
        cached = self.host_cache.get(key)
        if cached is not None:
            return cached
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._build(key))
            self._inflight[key] = future
            future.add_done_callback(lambda f, k=key: self._done(k, f))
        # shield: one caller giving up (cancel, deadline) must not abort the shared build.
        return await asyncio.shield(future)

    def _done(self, key: Key, future: asyncio.Future[AdapterWeights]) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved here: every waiter may have gone (cancelled)

    async def _build(self, key: Key) -> AdapterWeights:
        if isinstance(key, FusionKey):
            parts = [(await self.weights(k), w) for k, w in key.components]
            async with self._build_slot():
                built = await asyncio.to_thread(fuse, parts, max_rank=self._max_rank)
                prepared = await asyncio.to_thread(self.host_cache.prepare, built)
        else:
            resolved = self._resolved.get(key) or await self.resolve(key.adapter_id, key.version)
            path = await self.source.fetch(resolved)
            async with self._build_slot():
                try:
                    built = await asyncio.to_thread(self._load_fn, path)
                except Exception as exc:  # noqa: BLE001 - safetensors raises its own errors
                    # Malformed or unsupported files: retrying will not help, tell the caller.
                    raise adapter_incompatible(str(key), str(exc)) from exc
                prepared = await asyncio.to_thread(self.host_cache.prepare, built)
        self.host_cache.put(key, prepared)
        return prepared

    def _build_slot(self) -> asyncio.Semaphore:
        if self._build_slots is None:
            self._build_slots = asyncio.Semaphore(self._max_builds)
        return self._build_slots
