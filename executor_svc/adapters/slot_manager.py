"""GPU adapter slots: where adapters enter GPU memory, and who may use them.

The model has ``num_slots`` LoRA slots (slot-indexed weight buffers, vLLM style); a request's
tokens name slots, never adapters. This module decides which adapter lives in which slot:

- ``acquire(keys)`` returns a :class:`Lease` holding one reference per key. Resident adapters
  are reused; missing ones get a slot (an empty one first, else the least-recently-used slot
  with no references that is not pinned and not loading) and are loaded in the background:
  ``AdapterStore.weights`` (disk/host cache, download, parse, fuse) then ``model.set_lora``.
- Reservation of every slot a request needs happens in one synchronous step (no ``await``
  between the check and the claim), so two requests never take the same victim, and a request
  never holds some of its slots while waiting for the rest (no hold-and-wait deadlock).
- A request whose adapter is loading waits on that slot's ``ready`` future only; requests for
  resident adapters go ahead. Requests for the same cold adapter share one load.
- Requests that need a slot are served oldest first: a newcomer does not take a freed slot
  while older requests wait for one (a waiter needing two slots may still be passed by
  younger ones needing one, when only one is free).
- When too few slots are free or evictable (all referenced by running requests, or pinned),
  ``acquire`` waits up to its timeout for releases, then raises RESOURCE_EXHAUSTED with
  RetryInfo. A slot in use is never evicted; a pinned slot never.
- ``Lease.release()`` (idempotent, called from the request's ``finally``) drops the references.

Running example, 3 slots, LRU order by ``last_used``::

    slots:  0: a@1 refs=2   1: b@1 refs=0 (older)   2: c@3 refs=0 pinned
    acquire([a@1, d@1]) -> a@1 reused (refs=3); d@1 needs a victim: 0 is in use, 2 is pinned,
                           so slot 1 (b@1) is evicted and d@1 loads into it -> Lease([0, 1])
    acquire([e@1])      -> no victim (0 and 1 referenced, 2 pinned): waits, then exhausted

Based on: S-LoRA (Sheng et al., 2023) unified adapter paging and dLoRA (Wu et al., OSDI 2024)
host<->GPU adapter movement; slot-indexed layers after vLLM's ``LoRAModelManager``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Protocol

from executor_svc.adapters.host_cache import weights_nbytes
from executor_svc.adapters.refs import Key
from executor_svc.adapters.store import AdapterStore
from executor_svc.engine.types import AdapterWeights
from executor_svc.errors import adapter_incompatible, invalid, slots_busy
from loraserve.errors import FieldViolation


class LoraSlots(Protocol):
    """What the slot manager needs from the model (``engine.model``)."""

    def set_lora(self, slot: int, weights: AdapterWeights) -> None: ...


@dataclass(slots=True, eq=False)
class Slot:
    index: int
    key: Key | None = None
    refcount: int = 0
    pinned: bool = False
    last_used: float = 0.0
    nbytes: int = 0
    # Done once the adapter's weights are in the slot (exception if loading failed).
    ready: asyncio.Future[None] | None = None
    # UnloadAdapter on a slot in use: evict when the last reference goes.
    evict_when_idle: bool = False

    @property
    def loading(self) -> bool:
        return self.ready is not None and not self.ready.done()


@dataclass(slots=True, eq=False)
class Lease:
    """References to the slots of one request, in the order of the keys it asked for."""

    manager: SlotManager
    slots: list[Slot] = field(default_factory=list)
    released: bool = False

    @property
    def indices(self) -> list[int]:
        return [s.index for s in self.slots]

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.manager._release(self.slots)


class SlotManager:
    def __init__(
        self,
        model: LoraSlots,
        store: AdapterStore,
        num_slots: int,
        *,
        slot_bytes: int = 0,
        wait_timeout_s: float = 10.0,
        retry_after_s: float = 1.0,
    ):
        self.model = model
        self.store = store
        self.slots = [Slot(i) for i in range(num_slots)]
        self.slot_bytes = slot_bytes
        self._by_key: dict[Key, Slot] = {}
        self._wait_timeout_s = wait_timeout_s
        self._retry_after_s = retry_after_s
        self._changed = asyncio.Event()
        self._loads: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self.waiting = 0  # requests waiting for a slot (part of the queue depth)
        self.loads = 0  # adapters written into a slot so far (swap-ins)

    @property
    def num_free(self) -> int:
        return sum(1 for s in self.slots if s.key is None and s.refcount == 0)

    def slot_of(self, key: Key) -> Slot | None:
        return self._by_key.get(key)

    async def acquire(self, keys: list[Key], *, timeout: float | None = None, pin: bool = False):
        """A :class:`Lease` on slots holding ``keys`` (loaded when missing); see module doc."""
        if len(set(keys)) > len(self.slots):
            raise invalid(
                [
                    FieldViolation(
                        "plan.adapters",
                        f"needs {len(set(keys))} adapter slots, executor has {len(self.slots)}",
                    )
                ]
            )
        wait = self._wait_timeout_s if timeout is None else min(timeout, self._wait_timeout_s)
        deadline = time.monotonic() + wait
        # No overtaking: while requests wait for a slot, a newcomer that needs one queues
        # behind them (the event wakes waiters oldest first). Resident adapters never wait.
        barging = self.waiting and any(k not in self._by_key for k in keys)
        lease = None if barging else self._try_reserve(keys)
        if lease is None:
            self.waiting += 1
            try:
                while lease is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise slots_busy(len(keys), len(self.slots), self._retry_after_s)
                    changed = self._changed
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), remaining)
                    lease = self._try_reserve(keys)
            finally:
                self.waiting -= 1
                # Leaving the queue (served or given up), let the rest re-check: a slot this
                # request could not use, or a second slot freed by the same release, may fit.
                if self.waiting:
                    self._notify()
        if pin:
            for slot in lease.slots:
                slot.pinned = True
        try:
            for slot in lease.slots:
                assert slot.ready is not None
                if not slot.ready.done():
                    # shield: this request giving up must not cancel a load others wait for.
                    await asyncio.shield(slot.ready)
                elif slot.ready.exception() is not None:
                    raise slot.ready.exception()  # type: ignore[misc]
        except BaseException:
            lease.release()
            raise
        return lease

    def _try_reserve(self, keys: list[Key]) -> Lease | None:
        # Synchronous on purpose: check and claim without yielding to the event loop.
        missing = [k for k in dict.fromkeys(keys) if k not in self._by_key]
        if missing:
            victims = [
                s
                for s in self.slots
                if s.refcount == 0 and not s.pinned and not s.loading and s.key not in keys
            ]
            if len(victims) < len(missing):
                return None
            # Empty slots first, then least recently used.
            victims.sort(key=lambda s: (s.key is not None, s.last_used))
            for key, slot in zip(missing, victims, strict=False):
                self._assign(slot, key)
        now = time.monotonic()
        lease = Lease(self)
        for key in keys:
            slot = self._by_key[key]
            slot.refcount += 1
            slot.last_used = now
            lease.slots.append(slot)
        return lease

    def _assign(self, slot: Slot, key: Key) -> None:
        if slot.key is not None:
            self._by_key.pop(slot.key, None)
        slot.key, slot.nbytes, slot.evict_when_idle = key, 0, False
        slot.ready = asyncio.get_running_loop().create_future()
        slot.ready.add_done_callback(_retrieve)
        self._by_key[key] = slot
        task = asyncio.ensure_future(self._load(slot, key))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _load(self, slot: Slot, key: Key) -> None:
        assert slot.ready is not None
        try:
            weights = await self.store.weights(key)
            try:
                # In a worker thread: set_lora takes the model's step lock, so it waits for the
                # running forward step to end; the event loop must not wait with it. No running
                # request names this slot yet, so writing it between steps is safe.
                await asyncio.to_thread(self.model.set_lora, slot.index, weights)
            except (ValueError, IndexError) as exc:  # shapes/rank do not fit the model
                raise adapter_incompatible(str(key), str(exc)) from exc
            slot.nbytes = weights_nbytes(weights)
            self.loads += 1
            slot.ready.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter via the future
            self._by_key.pop(key, None)
            slot.key = None  # stays unusable until its last reference is released
            if isinstance(exc, asyncio.CancelledError):
                slot.ready.cancel()
            else:
                slot.ready.set_exception(exc)
            self._notify()
            if not isinstance(exc, Exception):
                raise

    def _release(self, slots: list[Slot]) -> None:
        now = time.monotonic()
        for slot in slots:
            slot.refcount -= 1
            slot.last_used = now
            if slot.refcount == 0 and slot.evict_when_idle and not slot.loading:
                self._evict(slot)
        self._notify()

    def _evict(self, slot: Slot) -> None:
        # No reset_lora: a slot no key maps to is named by no request, so its stale weights
        # are never read, and the next set_lora overwrites every module of it.
        if slot.key is not None:
            self._by_key.pop(slot.key, None)
        slot.key, slot.nbytes, slot.pinned, slot.evict_when_idle = None, 0, False, False
        slot.ready = None

    def unload(self, key: Key) -> bool:
        """Unpin and evict ``key`` now, or as soon as no request uses it. False if not resident."""
        slot = self._by_key.get(key)
        if slot is None:
            return False
        slot.pinned = False
        if slot.refcount == 0 and not slot.loading:
            self._evict(slot)
            self._notify()
        else:
            slot.evict_when_idle = True
        return True

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: a load may fail after every waiter left
