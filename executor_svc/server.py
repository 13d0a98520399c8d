"""Executor gRPC server: ExecutorService over :class:`~executor_svc.runtime.ExecutorRuntime`.

``build_server(settings)`` returns an :class:`ExecutorServer`. Its ``start()`` binds the port
with health NOT_SERVING and loads the model in the background; health turns SERVING once the
engine is warm. Requests that arrive meanwhile wait for warm-up (bounded by their deadline and
``warmup_wait_s``) instead of failing, so a caller that ignores health still gets answers.
``await server.wait_ready()`` blocks until warm (tests, tooling).

Errors are raised as :mod:`loraserve.errors` classes (see ``executor_svc/errors.py``); the
shared interceptor maps them to status codes with ``google.rpc`` details. Cancellation and
deadlines cancel the handler task; the runtime's ``finally`` frees KV and slot references.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing

import grpc

from executor_svc.adapters.residency import resident_adapters, resident_keys, resident_one
from executor_svc.engine.types import TokenEvent
from executor_svc.runtime import ExecutorRuntime
from executor_svc.settings import ExecutorSettings
from executor_svc.validation import check_request
from loraserve.api.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from loraserve.auth import TokenAuth
from loraserve.errors import InvalidArgument, NotFound
from loraserve.server import GrpcServer, ServiceRegistration

log = logging.getLogger("executor.server")

SERVICE_NAME = "loraserve.api.v1.ExecutorService"
_FINISH = {
    "length": executor_pb2.FINISH_REASON_LENGTH,
    "eos": executor_pb2.FINISH_REASON_EOS,
    "stop": executor_pb2.FINISH_REASON_STOP,
    "cancelled": executor_pb2.FINISH_REASON_CANCELLED,
}


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, settings: ExecutorSettings, runtime: ExecutorRuntime | None = None):
        self.settings = settings
        self.runtime = runtime or ExecutorRuntime(settings)

    async def _ready(self, context: grpc.aio.ServicerContext) -> ExecutorRuntime:
        await self.runtime.wait_ready(_remaining(context, self.settings.warmup_wait_s))
        return self.runtime

    async def _events(self, request, context) -> tuple[str, object]:
        """Validate, then the runtime's event stream for a (Stream)Generate request."""
        rt = await self._ready(context)
        request_id = request.request_id or uuid.uuid4().hex
        checked = check_request(
            request.request_id,
            request.prompt,
            request.plan,
            request.sampling,
            self.settings,
            rt.max_model_len,
            rt.tokenize,
        )
        events = rt.generate(
            request.prompt,
            checked.prompt_token_ids,
            request.plan,
            checked.sampling,
            context.time_remaining(),
        )
        return request_id, events

    async def Generate(self, request, context):
        start = time.perf_counter()
        request_id, events = await self._events(request, context)
        out = executor_pb2.GenerateResponse(request_id=request_id)
        texts: list[str] = []
        last: TokenEvent | None = None
        async with aclosing(events):
            async for event in events:
                if last is None:
                    out.time_to_first_token_ms = _ttft(start)
                texts.append(event.text)
                out.token_ids.extend(event.token_ids)
                last = event
        out.text = "".join(texts)
        if last is not None:
            out.finish_reason = _FINISH.get(last.finish_reason or "", 0)
            out.usage.CopyFrom(_usage(last))
        out.total_time_ms = (time.perf_counter() - start) * 1e3
        return out

    async def GenerateStream(self, request, context):
        start = time.perf_counter()
        request_id, events = await self._events(request, context)
        first = True
        # aclosing: a cancel that lands while gRPC writes a message (the runtime's stream is then
        # parked at its yield) must still run the runtime's finally now, not at garbage collection.
        async with aclosing(events):
            async for event in events:
                msg = executor_pb2.GenerateStreamResponse(
                    request_id=request_id, text=event.text, token_ids=event.token_ids
                )
                if first:
                    msg.time_to_first_token_ms = _ttft(start)
                    first = False
                if event.finish_reason is not None:
                    msg.finish_reason = _FINISH.get(event.finish_reason, 0)
                    msg.usage.CopyFrom(_usage(event))
                yield msg

    async def LoadAdapter(self, request, context):
        rt = await self._ready(context)
        ref = _check_ref(request.adapter)
        assert rt.store is not None and rt.slots is not None
        key = (await rt.store.resolve(ref.adapter_id, ref.version)).key
        lease = await rt.slots.acquire([key], timeout=context.time_remaining(), pin=request.pin)
        lease.release()  # loaded (and pinned if asked); no request holds it
        return executor_pb2.LoadAdapterResponse(
            adapter=resident_one(rt.slots, rt.store.host_cache, key)
        )

    async def UnloadAdapter(self, request, context):
        rt = await self._ready(context)
        ref = _check_ref(request.adapter)
        assert rt.store is not None and rt.slots is not None
        # Version 0 = every resident version of the adapter (no registry call needed); a fused
        # adapter is named by its "fusion-..." id from ListResidentAdapters.
        keys = [
            k
            for k in resident_keys(rt.slots, rt.store.host_cache)
            if k.adapter_id == ref.adapter_id and ref.version in (0, k.version)
        ]
        if not keys:
            raise NotFound(
                f"adapter {ref.adapter_id} is not resident on this executor",
                resource_type="adapter",
                resource_name=ref.adapter_id,
            )
        for key in keys:
            rt.slots.unload(key)
            rt.store.host_cache.pop(key)
        return executor_pb2.UnloadAdapterResponse()

    async def ListResidentAdapters(self, request, context):
        rt = await self._ready(context)
        assert rt.slots is not None and rt.store is not None
        return executor_pb2.ListResidentAdaptersResponse(
            adapters=resident_adapters(rt.slots, rt.store.host_cache),
            slots_total=len(rt.slots.slots),
            slots_free=rt.slots.num_free,
        )

    async def GetStats(self, request, context):
        rt = self.runtime
        out = executor_pb2.GetStatsResponse(
            replica_id=self.settings.resolved_replica_id,
            base_model=rt.base_model,
            device=rt.device,
        )
        if not rt.ready:  # answer during warm-up too: a router polls this
            return out
        assert rt.slots is not None and rt.engine is not None and rt.store is not None
        engine = rt.engine.stats()
        c = rt.counters
        free = rt.slots.num_free
        out.queue_depth = c.queued
        out.running_requests = c.running
        out.resident_adapters.extend(resident_adapters(rt.slots, rt.store.host_cache))
        out.kv_blocks_total = engine.kv_blocks_total
        out.kv_blocks_free = engine.kv_blocks_free
        out.adapter_slots_total = len(rt.slots.slots)
        out.adapter_slots_free = free
        out.adapter_memory_bytes_total = len(rt.slots.slots) * rt.slots.slot_bytes
        out.adapter_memory_bytes_free = free * rt.slots.slot_bytes
        out.requests_completed = c.completed
        out.tokens_generated = c.tokens
        if engine.merged_slot is not None:
            # Empty if UnloadAdapter evicted it meanwhile: its weights stay in the slot (and
            # merged) until the slot is written again, which unmerges them first.
            key = rt.slots.slots[engine.merged_slot].key
            out.merged_adapter_id = key.adapter_id if key is not None else ""
        return out


def _remaining(context: grpc.aio.ServicerContext, cap: float) -> float:
    left = context.time_remaining()
    return cap if left is None else min(cap, max(left, 0.0))


def _ttft(start: float) -> float:
    # From the RPC's arrival, not the engine's admission: includes adapter loading and queueing,
    # which is what the caller waited.
    return (time.perf_counter() - start) * 1e3


def _usage(event: TokenEvent) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
    )


def _check_ref(ref: common_pb2.AdapterRef) -> common_pb2.AdapterRef:
    if not ref.adapter_id:
        raise InvalidArgument.field("adapter.adapter_id", "empty")
    return ref


class ExecutorServer(GrpcServer):
    """A GrpcServer whose ``start()`` also loads the engine (in the background)."""

    def __init__(self, settings: ExecutorSettings, servicer: ExecutorServicer, **kw):
        super().__init__(
            "executor",
            [
                ServiceRegistration(
                    executor_pb2_grpc.add_ExecutorServiceServicer_to_server, servicer, SERVICE_NAME
                )
            ],
            serving_at_start=False,
            **kw,
        )
        self.runtime = servicer.runtime
        self._warmup: asyncio.Task[None] | None = None
        self.on_stop.append(self._stop_runtime)

    async def start(self) -> int:
        port = await super().start()
        self._warmup = asyncio.ensure_future(self._warm())
        return port

    async def _warm(self) -> None:
        try:
            await self.runtime.start()
        except Exception:  # noqa: BLE001 - logged by the runtime; health stays NOT_SERVING
            return
        await self.set_serving(True)

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self.runtime.wait_ready(timeout)

    async def _stop_runtime(self) -> None:
        if self._warmup is not None and not self._warmup.done():
            self._warmup.cancel()
        await self.runtime.stop()


def build_server(settings: ExecutorSettings) -> ExecutorServer:
    common = settings.common
    return ExecutorServer(
        settings,
        ExecutorServicer(settings),
        host=settings.host,
        port=settings.port,
        auth=TokenAuth(common.read_token, common.write_token, common.admin_token),
    )
