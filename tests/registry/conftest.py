"""Fixtures of the registry tests: one deployment (data dir + Celery worker thread) per module,
with the embedded SQLite broker or the machine's Redis (own key prefix, keys deleted after)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from registry_helpers import Client, Stack, serve_registry

from loraserve import vectors as V
from loraserve.embedding import shared_embedder
from loraserve.settings import CommonSettings
from registry_svc.db import close_database
from registry_svc.settings import RegistrySettings
from registry_svc.worker import make_celery, start_worker_thread

TEST_SETTINGS = dict(
    port=0,
    max_rank=16,
    watch_poll_interval_s=0.05,
    broker_poll_interval_s=0.05,
    maintenance_interval_s=3600.0,
)


@pytest.fixture(scope="session")
def embedder():
    """The embedding model, loaded once per session (workers in this process share it)."""
    return shared_embedder()


def delete_redis_keys(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        return client.delete(*keys) if keys else 0
    finally:
        client.close()


def make_stack(data_dir: Path, broker_url: str = "", **overrides) -> Stack:
    prefix = f"loraserve-test-{uuid.uuid4().hex[:12]}:" if broker_url else ""
    common = CommonSettings(data_dir=data_dir, broker_url=broker_url)
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


@pytest.fixture(scope="module", params=["embedded"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, embedder
) -> Iterator[Stack]:
    """A registry deployment with a real Celery worker thread; param "embedded" or "redis"."""
    broker = ""
    if request.param == "redis":
        broker = request.getfixturevalue("redis_url")
    st = make_stack(tmp_path_factory.mktemp(f"registry-{request.param}"), broker)
    try:
        st.worker = start_worker_thread(st.celery, ("ingest",), concurrency=1)
        yield st
    finally:
        close_stack(st)


@pytest.fixture
def registry(stack: Stack, tiny_model_dir: Path) -> Callable[[], object]:
    """``async with registry() as client:`` the real server on the module's deployment."""

    def open_client() -> object:
        return serve_registry(stack, tiny_model_dir)

    return open_client


__all__ = ["Client"]
