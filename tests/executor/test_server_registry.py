"""Registry -> executor: the real registry (server + embedded Celery worker) feeds the executor.

- Generate with an adapter the executor has never seen: GetAdapter + DownloadAdapter into the
  content-addressed cache, then the same tokens as an executor reading the same PEFT directory.
- Version 0 follows the latest READY version; NOT_FOUND propagates from the registry.
- A stream that breaks mid-file is resumed by offset: a relay in front of the real registry
  cuts every first DownloadAdapter stream of a file after one chunk (fault injection on the
  wire, the registry itself is untouched).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from executor_fixtures import executor_settings, plan, running_executor

from executor_svc.adapters.disk_cache import disk_usage
from executor_svc.adapters.refs import AdapterKey
from executor_svc.adapters.registry_client import RegistrySource
from loraserve import vectors as V
from loraserve.api.v1 import common_pb2, executor_pb2, registry_pb2, registry_pb2_grpc
from loraserve.errors import NotFound, Unavailable
from loraserve.server import GrpcServer, ServiceRegistration
from loraserve.settings import CommonSettings
from loraserve.upload import iter_push_requests
from registry_svc.server import build_server as build_registry
from registry_svc.settings import RegistrySettings
from registry_svc.worker import make_celery, start_worker_thread

BASE = "tiny-llama"
SAMPLES = ["Translate the sentence to French.", "Summarise the article in one line."]


@asynccontextmanager
async def registry(tmp_path: Path, tiny_model_dir: Path) -> AsyncIterator[tuple[str, object]]:
    common = CommonSettings(data_dir=tmp_path / "registry-data")
    settings = RegistrySettings(port=0, common=common)
    app = make_celery(common, settings=settings)
    server = build_registry(settings, celery=app)
    await server.start()
    worker = None
    try:
        worker = await asyncio.to_thread(start_worker_thread, app, ("ingest",), 1)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            await stub.RegisterBaseModel(
                registry_pb2.RegisterBaseModelRequest(
                    base_model_id=BASE, config_json=(tiny_model_dir / "config.json").read_text()
                )
            )
            yield server.address, stub
    finally:
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await server.stop(grace=0.5)
        V.close_qdrant(common)


async def push(stub, adapter_id: str, adapter_dir: Path) -> common_pb2.Adapter:
    header = registry_pb2.PushAdapterHeader(
        adapter_id=adapter_id, base_model=BASE, sample_inputs=SAMPLES
    )
    resp = await stub.PushAdapter(iter_push_requests(adapter_dir, header))
    deadline = time.monotonic() + 120
    while True:
        got = await stub.GetAdapter(
            registry_pb2.GetAdapterRequest(adapter_id=adapter_id, version=resp.adapter.version)
        )
        if got.adapter.status == common_pb2.ADAPTER_STATUS_READY:
            return got.adapter
        assert got.adapter.status != common_pb2.ADAPTER_STATUS_FAILED, got.adapter.failure_reason
        assert time.monotonic() < deadline, "adapter not READY in time"
        await asyncio.sleep(0.05)


class FlakyRelay(registry_pb2_grpc.RegistryServiceServicer):
    """Forwards to the real registry; cuts each file's first download after one chunk."""

    def __init__(self, target: registry_pb2_grpc.RegistryServiceStub, corrupt: bool = False):
        self.target = target
        self.corrupt = corrupt  # flip a byte of every chunk instead of cutting streams
        self.cut: set[str] = set()
        self.requests: list[tuple[str, int]] = []

    async def GetAdapter(self, request, context):
        try:
            return await self.target.GetAdapter(request)
        except grpc.aio.AioRpcError as exc:  # relay the registry's status as it is
            await context.abort(exc.code(), exc.details())

    async def ListAdapters(self, request, context):
        return await self.target.ListAdapters(request)

    async def DownloadAdapter(self, request, context):
        self.requests.append((request.file_name, request.offset))
        chunks = 0
        async for msg in self.target.DownloadAdapter(request):
            if self.corrupt and msg.HasField("chunk"):
                data = bytearray(msg.chunk.data)
                data[0] ^= 0xFF
                msg.chunk.data = bytes(data)
                yield msg
                continue
            yield msg
            chunks += msg.HasField("chunk")
            if chunks == 1 and request.file_name not in self.cut:
                self.cut.add(request.file_name)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (injected)")


async def test_executor_downloads_from_registry_and_matches_local(
    tmp_path, tiny_model_dir, adapter_factory
):
    v1 = adapter_factory("reg-a", rank=4, seed=11, init_scale=0.2)
    other = adapter_factory("reg-a-v2", rank=4, seed=12, init_scale=0.2)
    async with registry(tmp_path, tiny_model_dir) as (address, reg):
        await push(reg, "reg-a", v1)
        remote = executor_settings(
            tiny_model_dir, tmp_path / "exec-data", use_registry=True, latest_version_ttl_s=0.2
        )
        remote.common.registry_address = address
        local = executor_settings(
            tiny_model_dir, tmp_path / "local-data", adapter_dir=str(v1.parent)
        )
        request = executor_pb2.GenerateRequest(
            prompt="Translate the sentence",
            plan=plan(("reg-a", 1.0)),
            sampling=common_pb2.SamplingParams(max_tokens=12, min_tokens=12),
        )
        async with running_executor(local) as (_, local_stub):
            want = list((await local_stub.Generate(request)).token_ids)
        async with running_executor(remote) as (_, stub):
            got = await stub.Generate(request)
            assert list(got.token_ids) == want
            cache = tmp_path / "exec-data" / "executor-cache"
            (cached,) = (cache / "adapters").iterdir()
            assert cached.name.startswith("reg-a@1-")
            assert {p.name for p in cached.iterdir()} == {
                "adapter_config.json",
                "adapter_model.safetensors",
            }
            weights = (cached / "adapter_model.safetensors").read_bytes()
            assert weights == (v1 / "adapter_model.safetensors").read_bytes()
            assert (cache / "blobs" / hashlib.sha256(weights).hexdigest()).is_file()

            # A new READY version: version 0 follows it once the "latest" cache expires.
            await push(reg, "reg-a", other)
            await asyncio.sleep(remote.latest_version_ttl_s)
            latest = await stub.Generate(
                executor_pb2.GenerateRequest(
                    prompt="hi",
                    plan=plan(("reg-a", 1.0)),
                    sampling=common_pb2.SamplingParams(max_tokens=2),
                )
            )
            assert latest.finish_reason != 0
            listed = await stub.ListResidentAdapters(executor_pb2.ListResidentAdaptersRequest())
            assert {(a.adapter_id, a.version) for a in listed.adapters} >= {
                ("reg-a", 1),
                ("reg-a", 2),
            }

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(
                    executor_pb2.GenerateRequest(prompt="hi", plan=plan(("never-pushed", 1.0)))
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_broken_download_stream_resumes_by_offset(tmp_path, tiny_model_dir, adapter_factory):
    src = adapter_factory("reg-b", rank=8, seed=5)
    async with registry(tmp_path, tiny_model_dir) as (address, reg):
        await push(reg, "reg-b", src)
        async with grpc.aio.insecure_channel(address) as channel:
            relay = FlakyRelay(registry_pb2_grpc.RegistryServiceStub(channel))
            proxy = GrpcServer(
                "flaky-registry",
                [
                    ServiceRegistration(
                        registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                        relay,
                        "loraserve.api.v1.RegistryService",
                    )
                ],
            )
            await proxy.start()
            source = RegistrySource(proxy.address, tmp_path / "cache", chunk_size=1024)
            try:
                resolved = await source.resolve("reg-b", 0)
                assert resolved.key == AdapterKey("reg-b", 1) and resolved.sha256
                path = await source.fetch(resolved)
                with pytest.raises(NotFound):
                    await source.resolve("missing", 0)
            finally:
                await source.close()
                await proxy.stop(grace=0.1)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (path / name).read_bytes() == (src / name).read_bytes()
        # Each file (both > 1 KiB): one stream cut after its first 1 KiB chunk, then one
        # resumed at offset 1024, not restarted from 0.
        assert sorted(relay.requests) == [
            ("adapter_config.json", 0),
            ("adapter_config.json", 1024),
            ("adapter_model.safetensors", 0),
            ("adapter_model.safetensors", 1024),
        ]
        assert not list((tmp_path / "cache" / "blobs").glob("*.part"))


async def test_corrupted_download_is_refused_and_leaves_nothing(
    tmp_path, tiny_model_dir, adapter_factory
):
    src = adapter_factory("reg-c", rank=2, seed=6)
    async with registry(tmp_path, tiny_model_dir) as (address, reg):
        await push(reg, "reg-c", src)
        async with grpc.aio.insecure_channel(address) as channel:
            relay = FlakyRelay(registry_pb2_grpc.RegistryServiceStub(channel), corrupt=True)
            proxy = GrpcServer(
                "corrupting-registry",
                [
                    ServiceRegistration(
                        registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                        relay,
                        "loraserve.api.v1.RegistryService",
                    )
                ],
            )
            await proxy.start()
            source = RegistrySource(proxy.address, tmp_path / "cache")
            try:
                with pytest.raises(Unavailable) as info:
                    await source.fetch(await source.resolve("reg-c", 1))
                assert "sha256" in info.value.message
            finally:
                await source.close()
                await proxy.stop(grace=0.1)
        cache = tmp_path / "cache"
        assert not list(cache.rglob("*.part")) and not list((cache / "blobs").iterdir())
        assert not (cache / "adapters").exists()


async def test_disk_cache_evicts_least_recently_used_adapters(
    tmp_path, tiny_model_dir, adapter_factory
):
    """A disk budget of two adapters: fetching a third evicts the least recently used one (a
    fetch that finds an adapter counts as a use); fetching it again downloads it again."""
    names = ("ev-a", "ev-b", "ev-c")
    srcs = {n: adapter_factory(n, rank=2, seed=20 + i) for i, n in enumerate(names)}
    async with registry(tmp_path, tiny_model_dir) as (address, reg):
        for n in names:
            await push(reg, n, srcs[n])
        cache = tmp_path / "cache"
        paths = {}
        filler = RegistrySource(address, cache)
        try:
            for n in ("ev-a", "ev-b"):
                paths[n] = await filler.fetch(await filler.resolve(n, 1))
                await asyncio.sleep(0.01)  # distinct modification times
        finally:
            await filler.close()
        budget = disk_usage(cache) + 1  # room for exactly these two
        source = RegistrySource(address, cache, max_bytes=budget, min_age_s=0)
        try:
            assert await source.fetch(await source.resolve("ev-a", 1)) == paths["ev-a"]
            await asyncio.sleep(0.01)
            paths["ev-c"] = await source.fetch(await source.resolve("ev-c", 1))
            assert not paths["ev-b"].exists(), "the least recently used adapter was kept"
            assert paths["ev-a"].is_dir() and paths["ev-c"].is_dir()
            assert disk_usage(cache) <= budget
            await asyncio.sleep(0.01)
            again = await source.fetch(await source.resolve("ev-b", 1))
            assert not paths["ev-a"].exists() and paths["ev-c"].is_dir()
        finally:
            await source.close()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (again / name).read_bytes() == (srcs["ev-b"] / name).read_bytes()
