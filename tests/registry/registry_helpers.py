"""Helpers of the registry tests: a registry stack (data dir, Celery app, worker thread) and a
client over the real gRPC stubs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from celery import Celery

from loraserve import vectors as V
from loraserve.api.v1 import common_pb2, jobs_pb2_grpc, registry_pb2, registry_pb2_grpc
from loraserve.settings import CommonSettings
from loraserve.upload import iter_push_requests
from registry_svc.db import close_database
from registry_svc.server import build_server
from registry_svc.settings import RegistrySettings
from registry_svc.vector_index import count_points
from registry_svc.worker import WorkerThread, make_celery

BASE = "tiny-llama"
R = registry_pb2
S = common_pb2
SAMPLES = [
    "Translate to French: the cat sleeps on the sofa.",
    "Translate into French: where is the train station?",
    "How do you say 'good morning' in French?",
]
TERMINAL = {S.ADAPTER_STATUS_READY, S.ADAPTER_STATUS_FAILED, S.ADAPTER_STATUS_DELETED}


@dataclass
class Stack:
    """One registry deployment of a test module: settings, the Celery app that sends, and the
    worker thread that runs tasks (None when the module runs no worker)."""

    settings: RegistrySettings
    celery: Celery
    worker: WorkerThread | None = None
    redis_prefix: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def common(self):
        return self.settings.common

    def blob_files(self) -> set[str]:
        root = self.settings.resolved_blob_dir / "sha256"
        return {p.name for p in root.glob("*/*")} if root.exists() else set()

    def spool_files(self) -> list[Path]:
        tmp = self.settings.resolved_blob_dir / "tmp"
        return list(tmp.iterdir()) if tmp.exists() else []

    def points_of(self, adapter_id: str) -> int:
        """Points of an adapter in every collection (this process must own the Qdrant path)."""
        client = V.open_qdrant(self.common)
        return sum(
            count_points(client, c.name, adapter_id) for c in client.get_collections().collections
        )


@dataclass
class Client:
    address: str
    registry: registry_pb2_grpc.RegistryServiceStub
    jobs: jobs_pb2_grpc.JobServiceStub

    async def push(
        self,
        adapter_id: str,
        adapter_dir: Path,
        samples: Sequence[str] = SAMPLES,
        **header_fields,
    ) -> R.PushAdapterResponse:
        header = R.PushAdapterHeader(
            adapter_id=adapter_id, base_model=BASE, sample_inputs=list(samples), **header_fields
        )
        return await self.registry.PushAdapter(iter_push_requests(adapter_dir, header))

    async def get(self, adapter_id: str, version: int = 0) -> common_pb2.Adapter:
        resp = await self.registry.GetAdapter(
            R.GetAdapterRequest(adapter_id=adapter_id, version=version)
        )
        return resp.adapter

    async def wait(
        self, adapter_id: str, version: int = 0, timeout: float = 60.0, statuses=TERMINAL
    ) -> common_pb2.Adapter:
        deadline = time.monotonic() + timeout
        while True:
            adapter = await self.get(adapter_id, version)
            if adapter.status in statuses:
                return adapter
            if time.monotonic() > deadline:
                name = S.AdapterStatus.Name(adapter.status)
                raise TimeoutError(f"{adapter_id}@{version} still {name} after {timeout}s")
            await asyncio.sleep(0.03)


TEST_SETTINGS = dict(
    port=0,
    max_rank=16,
    watch_poll_interval_s=0.05,
    broker_poll_interval_s=0.05,
    maintenance_interval_s=3600.0,
)


def delete_redis_keys(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        return client.delete(*keys) if keys else 0
    finally:
        client.close()


def make_stack(data_dir: Path, broker_url: str = "", qdrant_url: str = "", **overrides) -> Stack:
    """Settings and Celery app of a deployment in ``data_dir`` (Redis when ``broker_url``)."""
    prefix = f"loraserve-test-{uuid.uuid4().hex[:12]}:" if broker_url else ""
    common = CommonSettings(data_dir=data_dir, broker_url=broker_url, qdrant_url=qdrant_url)
    settings = RegistrySettings(
        common=common, broker_key_prefix=prefix, **{**TEST_SETTINGS, **overrides}
    )
    return Stack(
        settings=settings, celery=make_celery(common, settings=settings), redis_prefix=prefix
    )


def close_stack(stack: Stack) -> None:
    if stack.worker is not None:
        stack.worker.stop()
        stack.worker = None
    V.close_qdrant(stack.common)
    close_database(stack.common)
    if stack.redis_prefix:
        delete_redis_keys(stack.common.broker_url, stack.redis_prefix)


@asynccontextmanager
async def serve_registry(stack: Stack, tiny_model_dir: Path) -> AsyncIterator[Client]:
    """The real registry server on port 0 (base model registered), and a client to it."""
    server = build_server(stack.settings, celery=stack.celery)
    await server.start()
    channel = grpc.aio.insecure_channel(
        server.address,
        options=[
            ("grpc.max_send_message_length", 8 << 20),
            ("grpc.max_receive_message_length", 8 << 20),
        ],
    )
    try:
        client = Client(
            address=server.address,
            registry=registry_pb2_grpc.RegistryServiceStub(channel),
            jobs=jobs_pb2_grpc.JobServiceStub(channel),
        )
        await client.registry.RegisterBaseModel(
            R.RegisterBaseModelRequest(
                base_model_id=BASE, config_json=(tiny_model_dir / "config.json").read_text()
            )
        )
        yield client
    finally:
        await channel.close()
        await server.stop(grace=0.5)
