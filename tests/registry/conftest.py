"""Fixtures of the registry tests: one deployment (data dir + Celery worker thread) per module,
with the embedded SQLite broker or the machine's Redis (own key prefix, keys deleted after)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from registry_helpers import Stack, close_stack, make_stack, serve_registry

from loraserve.embedding import shared_embedder
from registry_svc.worker import start_worker_thread


@pytest.fixture(scope="session")
def embedder():
    """The embedding model, loaded once per session (workers in this process share it)."""
    return shared_embedder()


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
