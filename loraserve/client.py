"""The typed SDK: ``loraserve.Client`` (sync) and ``loraserve.AsyncClient``.

``generate``/``stream`` do the whole flow in one call: Retrieve a plan for the prompt (unless
one is given), Route it to an executor replica, and Generate there. Every failed call raises
the matching ``loraserve.errors`` class with the server's details.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import suppress
from pathlib import Path

import grpc

from loraserve import requests as rq
from loraserve.api.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from loraserve.errors import DeadlineExceeded, FailedPrecondition, from_rpc_error
from loraserve.settings import CommonSettings

READY = common_pb2.ADAPTER_STATUS_READY
FAILED = common_pb2.ADAPTER_STATUS_FAILED
_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def _progress_bar(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)


def _adapter_bytes(adapter_dir: Path) -> int:
    return sum(
        f.stat().st_size
        for f in adapter_dir.iterdir()
        if f.is_file() and f.suffix in {".json", ".safetensors"}
    )


class _Base:
    """What the sync and async clients share: addresses, stubs, request building, checks."""

    def __init__(
        self,
        registry: str | None = None,
        retriever: str | None = None,
        executor: str | None = None,
        *,
        token: str | None = None,
        base_model: str | None = None,
        timeout: float = 60.0,
    ):
        common = CommonSettings()
        self.registry_address = registry or common.registry_address
        self.retriever_address = retriever or common.retriever_address
        # With an explicit executor, plans are sent there directly (no Route call).
        self.executor_address = executor
        self.base_model = base_model or "default"
        self.timeout = timeout
        token = token if token is not None else common.client_token
        self._metadata = [("authorization", f"Bearer {token}")] if token else []

    def _channel(self, address: str):  # a sync or an aio channel, cached per address
        raise NotImplementedError

    @property
    def registry(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self._channel(self.registry_address))

    @property
    def retriever(self) -> retriever_pb2_grpc.RetrieverServiceStub:
        return retriever_pb2_grpc.RetrieverServiceStub(self._channel(self.retriever_address))

    def executor(self, address: str) -> executor_pb2_grpc.ExecutorServiceStub:
        return executor_pb2_grpc.ExecutorServiceStub(self._channel(address))

    def _push_requests(
        self,
        path: str | Path,
        adapter_id: str,
        base_model: str | None,
        progress: bool,
        header: dict,
    ):
        """(request iterator, progress bar or None) for PushAdapter."""
        from loraserve.upload import iter_push_requests

        adapter_dir = Path(path)
        head = rq.push_header(adapter_dir, adapter_id, base_model or self.base_model, **header)
        bar = _progress_bar(_adapter_bytes(adapter_dir), f"push {adapter_id}") if progress else None
        return iter_push_requests(adapter_dir, head, on_progress=bar.update if bar else None), bar

    @staticmethod
    def _ready_or_none(
        adapter: common_pb2.Adapter, deadline: float, timeout: float
    ) -> common_pb2.Adapter | None:
        """The adapter when READY, None to keep polling; FAILED or the deadline raise."""
        if adapter.status == READY:
            return adapter
        if adapter.status == FAILED:
            raise FailedPrecondition(
                f"adapter {adapter.adapter_id}@{adapter.version} failed: {adapter.failure_reason}"
            )
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"adapter {adapter.adapter_id} not READY after {timeout:.0f}s")
        return None

    @staticmethod
    def _list_request(
        page_size: int, token: str, filter_fields: dict
    ) -> registry_pb2.ListAdaptersRequest:
        return registry_pb2.ListAdaptersRequest(
            filter=registry_pb2.AdapterFilter(**filter_fields),
            page_size=page_size,
            page_token=token,
        )

    def _route_request(self, plan: common_pb2.LoraPlan) -> retriever_pb2.RouteRequest:
        return retriever_pb2.RouteRequest(plan=plan, base_model=self.base_model)


class Client(_Base):
    """Synchronous client for the registry, retriever and executors."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address, options=_OPTIONS)
        return self._channels[address]

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # Registry -------------------------------------------------------------------------------
    def register_base_model(
        self, base_model_id: str, model_dir_or_config: str | Path
    ) -> registry_pb2.BaseModel:
        req = rq.base_model_request(base_model_id, model_dir_or_config)
        return self._call(self.registry.RegisterBaseModel, req).base_model

    def push_adapter(
        self,
        path: str | Path,
        adapter_id: str,
        *,
        base_model: str | None = None,
        progress: bool = True,
        wait: bool = False,
        wait_timeout: float = 120.0,
        **header,
    ) -> common_pb2.Adapter:
        """Upload a PEFT adapter directory in chunks (with a progress bar); optionally wait for READY."""
        requests, bar = self._push_requests(path, adapter_id, base_model, progress, header)
        try:
            adapter = self._call(
                self.registry.PushAdapter, requests, timeout=max(self.timeout, 600)
            ).adapter
        finally:
            if bar is not None:
                bar.close()
        return (
            self.wait_ready(adapter.adapter_id, adapter.version, wait_timeout) if wait else adapter
        )

    def wait_ready(
        self, adapter_id: str, version: int = 0, timeout: float = 120.0
    ) -> common_pb2.Adapter:
        """Poll until the version is READY; FAILED raises FailedPrecondition with the reason."""
        deadline = time.monotonic() + timeout
        while (
            ready := self._ready_or_none(self.get_adapter(adapter_id, version), deadline, timeout)
        ) is None:
            time.sleep(0.1)
        return ready

    def get_adapter(self, adapter_id: str, version: int = 0) -> common_pb2.Adapter:
        req = registry_pb2.GetAdapterRequest(adapter_id=adapter_id, version=version)
        return self._call(self.registry.GetAdapter, req).adapter

    def adapters(self, page_size: int = 100, **filter_fields) -> Iterator[common_pb2.Adapter]:
        """Every adapter matching the filter, page by page."""
        token = ""
        while True:
            resp = self._call(
                self.registry.ListAdapters, self._list_request(page_size, token, filter_fields)
            )
            yield from resp.adapters
            token = resp.next_page_token
            if not token:
                return

    def delete_adapter(self, adapter_id: str, version: int = 0) -> list[common_pb2.Adapter]:
        req = registry_pb2.DeleteAdapterRequest(adapter_id=adapter_id, version=version)
        return list(self._call(self.registry.DeleteAdapter, req).deleted)

    # Retrieval and generation ----------------------------------------------------------------
    def retrieve(
        self, prompts: Sequence[str], *, top_k: int = 0, strategy=None, **filters
    ) -> retriever_pb2.RetrieveResponse:
        req = rq.retrieve_request(prompts, self.base_model, top_k, strategy, **filters)
        return self._call(self.retriever.Retrieve, req)

    def _resolve(
        self, prompt: str, plan: rq.PlanLike, strategy, top_k: int
    ) -> tuple[common_pb2.LoraPlan, str]:
        lora_plan = rq.to_plan(plan, strategy)
        if lora_plan is None:
            lora_plan = self.retrieve([prompt], top_k=top_k, strategy=strategy).plans[0].plan
        if self.executor_address:
            return lora_plan, self.executor_address
        return lora_plan, self._call(self.retriever.Route, self._route_request(lora_plan)).address

    def generate(
        self, prompt: str, *, plan: rq.PlanLike = None, strategy=None, top_k: int = 0, **sampling
    ) -> rq.GenerateResult:
        """Retrieve (unless ``plan`` is given), route and generate; returns the whole completion."""
        lora_plan, address = self._resolve(prompt, plan, strategy, top_k)
        req = executor_pb2.GenerateRequest(
            prompt=prompt, plan=lora_plan, sampling=rq.sampling(**sampling)
        )
        return rq.generate_result(
            self._call(self.executor(address).Generate, req), lora_plan, address
        )

    def stream(
        self, prompt: str, *, plan: rq.PlanLike = None, strategy=None, top_k: int = 0, **sampling
    ) -> Iterator[rq.StreamChunk]:
        """Like ``generate`` but yields text as it is produced; closing the iterator cancels."""
        lora_plan, address = self._resolve(prompt, plan, strategy, top_k)
        req = executor_pb2.GenerateStreamRequest(
            prompt=prompt, plan=lora_plan, sampling=rq.sampling(**sampling)
        )
        call = self.executor(address).GenerateStream(
            req, timeout=self.timeout, metadata=self._metadata
        )
        try:
            for resp in call:
                yield rq.stream_chunk(resp, lora_plan)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as :class:`Client`."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=_OPTIONS)
        return self._channels[address]

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def register_base_model(
        self, base_model_id: str, model_dir_or_config: str | Path
    ) -> registry_pb2.BaseModel:
        req = rq.base_model_request(base_model_id, model_dir_or_config)
        return (await self._call(self.registry.RegisterBaseModel, req)).base_model

    async def push_adapter(
        self,
        path: str | Path,
        adapter_id: str,
        *,
        base_model: str | None = None,
        progress: bool = False,
        wait: bool = False,
        wait_timeout: float = 120.0,
        **header,
    ) -> common_pb2.Adapter:
        requests, bar = self._push_requests(path, adapter_id, base_model, progress, header)
        try:
            adapter = (
                await self._call(
                    self.registry.PushAdapter, requests, timeout=max(self.timeout, 600)
                )
            ).adapter
        finally:
            if bar is not None:
                bar.close()
        return (
            await self.wait_ready(adapter.adapter_id, adapter.version, wait_timeout)
            if wait
            else adapter
        )

    async def wait_ready(
        self, adapter_id: str, version: int = 0, timeout: float = 120.0
    ) -> common_pb2.Adapter:
        deadline = time.monotonic() + timeout
        while (
            ready := self._ready_or_none(
                await self.get_adapter(adapter_id, version), deadline, timeout
            )
        ) is None:
            await asyncio.sleep(0.1)
        return ready

    async def get_adapter(self, adapter_id: str, version: int = 0) -> common_pb2.Adapter:
        req = registry_pb2.GetAdapterRequest(adapter_id=adapter_id, version=version)
        return (await self._call(self.registry.GetAdapter, req)).adapter

    async def adapters(
        self, page_size: int = 100, **filter_fields
    ) -> AsyncIterator[common_pb2.Adapter]:
        token = ""
        while True:
            resp = await self._call(
                self.registry.ListAdapters, self._list_request(page_size, token, filter_fields)
            )
            for adapter in resp.adapters:
                yield adapter
            token = resp.next_page_token
            if not token:
                return

    async def delete_adapter(self, adapter_id: str, version: int = 0) -> list[common_pb2.Adapter]:
        req = registry_pb2.DeleteAdapterRequest(adapter_id=adapter_id, version=version)
        return list((await self._call(self.registry.DeleteAdapter, req)).deleted)

    async def retrieve(
        self, prompts: Sequence[str], *, top_k: int = 0, strategy=None, **filters
    ) -> retriever_pb2.RetrieveResponse:
        req = rq.retrieve_request(prompts, self.base_model, top_k, strategy, **filters)
        return await self._call(self.retriever.Retrieve, req)

    async def _resolve(
        self, prompt: str, plan: rq.PlanLike, strategy, top_k: int
    ) -> tuple[common_pb2.LoraPlan, str]:
        lora_plan = rq.to_plan(plan, strategy)
        if lora_plan is None:
            lora_plan = (
                (await self.retrieve([prompt], top_k=top_k, strategy=strategy)).plans[0].plan
            )
        if self.executor_address:
            return lora_plan, self.executor_address
        return lora_plan, (
            await self._call(self.retriever.Route, self._route_request(lora_plan))
        ).address

    async def generate(
        self, prompt: str, *, plan: rq.PlanLike = None, strategy=None, top_k: int = 0, **sampling
    ) -> rq.GenerateResult:
        lora_plan, address = await self._resolve(prompt, plan, strategy, top_k)
        req = executor_pb2.GenerateRequest(
            prompt=prompt, plan=lora_plan, sampling=rq.sampling(**sampling)
        )
        return rq.generate_result(
            await self._call(self.executor(address).Generate, req), lora_plan, address
        )

    async def stream(
        self, prompt: str, *, plan: rq.PlanLike = None, strategy=None, top_k: int = 0, **sampling
    ) -> AsyncIterator[rq.StreamChunk]:
        lora_plan, address = await self._resolve(prompt, plan, strategy, top_k)
        req = executor_pb2.GenerateStreamRequest(
            prompt=prompt, plan=lora_plan, sampling=rq.sampling(**sampling)
        )
        call = self.executor(address).GenerateStream(
            req, timeout=self.timeout, metadata=self._metadata
        )
        try:
            async for resp in call:
                yield rq.stream_chunk(resp, lora_plan)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self._channels.values():
            with suppress(Exception):
                await channel.close()
        self._channels.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
