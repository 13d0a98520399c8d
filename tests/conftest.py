"""Fixtures shared by every test: tiny models, PEFT adapters, in-process servers, Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
import pytest  # noqa: E402

from loraserve.devmodels import build_tiny_model, write_lora_adapter  # noqa: E402
from loraserve.server import GrpcServer  # noqa: E402

REDIS_URL = os.environ.get("LORASERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
TINY_BASE_MODEL_ID = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer Llama (hidden 64, GQA 4/2 heads) with a byte-level BPE tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), architecture="llama")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build other tiny checkpoints: ``tiny_model_factory("qwen2", num_layers=3)``."""
    cache: dict[tuple, Path] = {}

    def make(architecture: str = "llama", **kw) -> Path:
        key = (architecture, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_tiny_model(
                tmp_path_factory.mktemp(f"tiny-{architecture}"), architecture=architecture, **kw
            )
        return cache[key]

    return make


@pytest.fixture
def adapter_factory(tmp_path: Path, tiny_model_dir: Path) -> Callable[..., Path]:
    """Write PEFT adapters for the tiny model: ``adapter_factory("a1", rank=4, seed=1)``.

    Keyword arguments go to :func:`loraserve.devmodels.write_lora_adapter` (rank, alpha,
    target_modules, rank_pattern, alpha_pattern, use_rslora, seed, dtype, base_model_dir).
    """

    def make(name: str = "adapter", **kw) -> Path:
        base = kw.pop("base_model_dir", tiny_model_dir)
        kw.setdefault("base_model_id", TINY_BASE_MODEL_ID)
        return write_lora_adapter(tmp_path / "adapters" / name, base, **kw)

    return make


@asynccontextmanager
async def running(server: GrpcServer) -> AsyncIterator[GrpcServer]:
    """Start a server on its (usually 0 = free) port and stop it afterwards."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@pytest.fixture
def serve() -> Callable[[GrpcServer], object]:
    """``async with serve(build_server(settings)) as srv: ... srv.address``."""
    return running


@asynccontextmanager
async def aio_channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(address)
    try:
        yield channel
    finally:
        await channel.close()


@pytest.fixture
def channel_to() -> Callable[[str], object]:
    """``async with channel_to(srv.address) as ch: stub = XServiceStub(ch)``."""
    return aio_channel


@pytest.fixture
def redis_key_prefix() -> str:
    """A key prefix of this test's own on the shared Redis (Celery ``global_keyprefix``)."""
    return f"loraserve-test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis; tests use a db number and key prefix of their own."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:  # pragma: no cover - machine without Redis
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL
