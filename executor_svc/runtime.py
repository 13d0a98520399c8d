"""The executor's moving parts wired together: engine, adapter store, GPU slots, admission.

Lifecycle: ``start()`` (run in the background by the server, health NOT_SERVING meanwhile)
prepares the model directory, starts and warms the engine, then builds the adapter path
(source -> disk cache -> host cache -> slots) around ``engine.model``. ``stop()`` reverses it.

One request (``generate``), with where each resource is taken and given back::

    admit          queue_depth += 1           RESOURCE_EXHAUSTED + RetryInfo if the queue is full
    resolve plan   version 0 -> latest READY  NOT_FOUND for an unknown adapter
    acquire slots  Lease (refs on slots)      waits for loads / free slots, oldest first;
                                              RESOURCE_EXHAUSTED + RetryInfo when all stay busy
    engine         KV blocks                  TokenEvents until finish_reason
    finally        aclose(engine stream)      aborts the request in the engine: KV freed
                   lease.release()            refs back; slots evictable again
                   queue_depth -= 1 (if still queued)

The ``finally`` runs on normal end, on errors and on cancellation (client cancel and gRPC
deadline both cancel the handler task), so nothing leaks whichever way a request ends.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from executor_svc.adapters.host_cache import HostCache
from executor_svc.adapters.local_source import ChainSource, LocalDirSource
from executor_svc.adapters.plans import resolve_plan
from executor_svc.adapters.refs import AdapterSource
from executor_svc.adapters.registry_client import RegistrySource
from executor_svc.adapters.slot_manager import SlotManager
from executor_svc.adapters.store import AdapterStore
from executor_svc.engine.types import EngineRequest, SamplingOptions, TokenEvent
from executor_svc.errors import deadline_exceeded, queue_full, warming_up
from executor_svc.settings import ExecutorSettings
from loraserve.api.v1 import common_pb2
from loraserve.errors import ResourceExhausted

log = logging.getLogger("executor.runtime")


@dataclass(slots=True)
class Counters:
    queued: int = 0  # admitted, no token produced yet (waiting for slots, a seat, prefill)
    running: int = 0  # producing tokens
    completed: int = 0
    tokens: int = 0


class ExecutorRuntime:
    def __init__(self, settings: ExecutorSettings):
        self.settings = settings
        self.engine = None
        self.store: AdapterStore | None = None
        self.slots: SlotManager | None = None
        self.source: AdapterSource | None = None
        self.device = ""
        self.base_model = ""
        self.counters = Counters()
        self.failure: str | None = None
        self._started = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm the model, then build the adapter path. Sets ``failure`` on error."""
        try:
            await self._start()
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("executor failed to start")
            raise
        finally:
            self._started.set()  # wakes waiting requests on success and on failure alike

    async def _start(self) -> None:
        import torch

        from executor_svc.engine import Engine
        from executor_svc.engine.merging import MergePolicy
        from executor_svc.model.lora_loader import load_adapter

        s = self.settings
        model_dir = Path(s.model_dir) if s.model_dir else await asyncio.to_thread(self._tiny_model)
        self.base_model = model_dir.name
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        engine = Engine(
            str(model_dir),
            device=device,
            dtype=None if s.dtype == "auto" else getattr(torch, s.dtype),
            num_lora_slots=s.num_lora_slots or self._slots_from_budget(model_dir, device),
            max_lora_rank=s.max_lora_rank,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            kv_memory_bytes=s.kv_memory_bytes or None,
            max_model_len=s.max_model_len,
            merge_policy=MergePolicy(
                enabled=s.merge_adapters,
                patience=s.merge_patience_steps,
                merge_at=s.merge_at_share,
                unmerge_below=s.unmerge_below_share,
            ),
        )
        await engine.start()
        self.engine = engine
        self.source = self._build_source()
        # Adapters are parsed on the host in the model's dtype, so a slot copy is a plain copy.
        dtype = engine.model.dtype
        host = HostCache(s.host_cache_bytes, pin_memory=s.pin_host_cache and device != "cpu")
        self.store = AdapterStore(
            self.source,
            host,
            lambda path: load_adapter(path, dtype=dtype, packed=True, pin=host.pin),
            max_rank=s.max_lora_rank,
            latest_ttl_s=s.latest_version_ttl_s,
            max_concurrent_builds=s.adapter_load_concurrency,
        )
        self.slots = SlotManager(
            engine.model,
            self.store,
            engine.model.num_slots,
            slot_bytes=engine.model.lora_bytes_per_slot(),
            wait_timeout_s=s.slot_wait_s,
        )
        log.info(
            "executor ready",
            extra={"model": str(model_dir), "device": device, "slots": engine.model.num_slots},
        )

    def _tiny_model(self) -> Path:
        from loraserve.devmodels import build_tiny_model

        out = self.settings.tiny_model_dir
        if not (out / "config.json").is_file():
            # Build next to the target and rename: a crash mid-build leaves no half model.
            tmp = out.with_name(f".{out.name}-{uuid.uuid4().hex[:8]}")
            build_tiny_model(tmp, architecture="llama")
            try:
                tmp.rename(out)
            except OSError:  # another process built it first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return out

    def _slots_from_budget(self, model_dir: Path, device: str) -> int:
        """num_lora_slots=0: as many slots as adapter_memory_bytes holds (at least 1)."""
        import torch

        from executor_svc.model.loader import build_model, load_hf_config

        # A meta-device model allocates nothing but knows its buffer shapes.
        probe = build_model(
            load_hf_config(model_dir),
            device=torch.device("meta"),
            dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
            num_slots=1,
            max_rank=self.settings.max_lora_rank,
            max_positions=self.settings.max_model_len,
        )
        per_slot = max(1, probe.lora_bytes_per_slot())
        return max(1, self.settings.adapter_memory_bytes // per_slot)

    def _build_source(self) -> AdapterSource:
        s = self.settings
        sources: list[AdapterSource] = []
        if s.adapter_dir:
            sources.append(LocalDirSource(s.adapter_dir))
        if s.use_registry:
            sources.append(
                RegistrySource(
                    s.common.registry_address,
                    s.cache_dir,
                    token=s.common.client_token,
                    max_bytes=s.disk_cache_bytes,
                )
            )
        return sources[0] if len(sources) == 1 else ChainSource(sources)

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        for source in getattr(self.source, "sources", [self.source]):
            close = getattr(source, "close", None)
            if close is not None:
                await close()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Return once warm; UNAVAILABLE if start failed, the engine died, or ``timeout`` passes."""
        if not self._started.is_set():
            wait = self.settings.warmup_wait_s if timeout is None else timeout
            try:
                await asyncio.wait_for(self._started.wait(), wait)
            except TimeoutError:
                raise warming_up("model still loading") from None
        if self.failure:
            raise warming_up(f"start failed: {self.failure}")
        if self.engine is not None and self.engine.error is not None:
            raise warming_up(f"engine stopped: {self.engine.error!r}")

    @property
    def ready(self) -> bool:
        return self._started.is_set() and self.failure is None

    # -- requests ------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """The engine's limit (the setting, capped by the model's positions)."""
        assert self.engine is not None
        return self.engine.max_model_len

    def tokenize(self, text: str) -> list[int]:
        assert self.engine is not None
        return self.engine.tokenizer(text)["input_ids"]

    async def generate(
        self,
        prompt: str,
        prompt_token_ids: list[int],
        plan: common_pb2.LoraPlan,
        sampling: SamplingOptions,
        timeout: float | None,
    ) -> AsyncIterator[TokenEvent]:
        """Run one request; see the module docstring for where resources come and go."""
        assert self.engine is not None and self.slots is not None and self.store is not None
        c = self.counters
        if c.queued >= self.settings.max_queue:
            raise queue_full(c.queued, self.settings.max_queue, retry_after_s=1.0)
        c.queued += 1
        queued, lease = True, None
        try:
            resolved = await resolve_plan(plan, self.store)
            try:
                lease = await self.slots.acquire(resolved.keys, timeout=timeout)
            except ResourceExhausted:
                if timeout is not None and timeout <= self.settings.slot_wait_s:
                    raise deadline_exceeded("waiting for an adapter slot") from None
                raise
            request = EngineRequest(
                # The engine's own id: callers may reuse theirs, the engine needs unique ones.
                uuid.uuid4().hex,
                prompt,
                list(zip(lease.indices, resolved.weights, strict=True)),
                sampling,
                prompt_token_ids=prompt_token_ids,
            )
            async with aclosing(self.engine.generate(request)) as events:
                async for event in events:
                    if queued:
                        queued = False
                        c.queued -= 1
                        c.running += 1
                    c.tokens += len(event.token_ids)
                    yield event
            c.completed += 1
        finally:
            if queued:
                c.queued -= 1
            else:
                c.running -= 1
            if lease is not None:
                lease.release()
