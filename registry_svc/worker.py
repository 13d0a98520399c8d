"""The Celery app of loraserve's asynchronous work, and an in-process worker.

Queues: ``ingest`` (adapter ingestion, point deletion; :mod:`registry_svc.tasks`) and
``train`` (``loraserve.train_retriever`` from :mod:`retriever_svc.training`, when installed).

Process model. Qdrant local mode allows one process per path, and the registry's gRPC process
never opens Qdrant: every Qdrant write runs in a Celery task. With no ``LORASERVE_QDRANT_URL``
(the one-machine default) the worker runs as threads inside the retriever's process, which owns
the local Qdrant (:func:`start_worker_thread`); with a Qdrant server it is its own process::

    celery -A registry_svc.worker worker -Q ingest,train -c 1

Broker: ``common.resolved_broker_url()`` — Redis when ``LORASERVE_BROKER_URL`` is set, else
kombu's SQLAlchemy transport on a SQLite file (no server). Delivery guarantees differ: on Redis
tasks are acknowledged late and redelivered after a worker dies (``visibility_timeout``); the
SQLite transport hides a message when it is fetched, so the registry re-sends ingestion of
records that stall (:func:`registry_svc.ingest_dispatch.requeue_stalled`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.worker import WorkController

from loraserve.settings import CommonSettings
from registry_svc.embedded_broker import TRANSPORT_PATH as EMBEDDED_TRANSPORT
from registry_svc.settings import RegistrySettings

log = logging.getLogger("loraserve.registry.worker")

INGEST_QUEUE, TRAIN_QUEUE = "ingest", "train"
TASK_INGEST = "loraserve.ingest_adapter"
TASK_DELETE_POINTS = "loraserve.delete_adapter_points"
TASK_TRAIN_RETRIEVER = "loraserve.train_retriever"
TASK_TRAIN_GATE = "loraserve.train_gate"
_OPTIONAL_TASK_MODULES = ("retriever_svc.training",)


def make_celery(
    common: CommonSettings,
    *,
    key_prefix: str = "",
    settings: RegistrySettings | None = None,
) -> Celery:
    """A configured app. ``key_prefix`` (Redis only) isolates deployments and tests sharing
    one Redis; empty = ``settings.broker_key_prefix``. ``settings`` defaults to the
    ``LORASERVE_REGISTRY_*`` environment with this ``common``."""
    settings = settings or RegistrySettings(common=common)
    if settings.common is not common:
        settings = settings.model_copy(update={"common": common})
    broker = common.resolved_broker_url()
    include = ["registry_svc.tasks"] + [m for m in _OPTIONAL_TASK_MODULES if _module_exists(m)]
    transport: str | None = None
    if broker.startswith("sqla+"):
        broker, transport = broker.removeprefix("sqla+"), EMBEDDED_TRANSPORT
        transport_options: dict[str, Any] = {"polling_interval": settings.broker_poll_interval_s}
    else:
        transport_options = {"visibility_timeout": settings.visibility_timeout_s}
        if key_prefix or settings.broker_key_prefix:
            transport_options["global_keyprefix"] = key_prefix or settings.broker_key_prefix
    app = Celery("loraserve", broker=broker, include=include, set_as_current=False)
    app.conf.update(
        broker_transport=transport,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # status lives in the registry, not in Celery results
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=INGEST_QUEUE,
        task_routes={
            TASK_INGEST: {"queue": INGEST_QUEUE},
            TASK_DELETE_POINTS: {"queue": INGEST_QUEUE},
            TASK_TRAIN_RETRIEVER: {"queue": TRAIN_QUEUE},
            TASK_TRAIN_GATE: {"queue": TRAIN_QUEUE},
        },
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        broker_pool_limit=4,
    )
    app.loraserve_settings = settings  # read by the tasks through self.app
    return app


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # parent package missing
        return False


class _ThreadWorkController(WorkController):
    """A WorkController that says when its consumer is ready."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.started = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.started.set()


class WorkerThread:
    """Handle of a Celery worker running in a thread of this process."""

    def __init__(self, controller: _ThreadWorkController, thread: threading.Thread):
        self.controller = controller
        self.thread = thread

    @property
    def hostname(self) -> str:
        return self.controller.hostname

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown: finish (or hand back) the running task, close the broker connection."""
        if self.thread.is_alive():
            self.controller.stop(in_sighandler=False)
            self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"celery worker {self.hostname} did not stop in {timeout}s")


def start_worker_thread(
    app: Celery,
    queues: Sequence[str] = (INGEST_QUEUE, TRAIN_QUEUE),
    concurrency: int = 1,
    *,
    loglevel: str = "WARNING",
    ready_timeout: float = 60.0,
) -> WorkerThread:
    """Run a real Celery worker (threads pool) inside this process; returns once it consumes.

    Used by the retriever's process in the one-machine default, and by tests. Celery's pools
    look tasks up on the process's default app, so ``app`` becomes it: one app per process.
    """
    app.set_default()
    app.set_current()
    controller = _ThreadWorkController(
        app=app,
        hostname=f"loraserve-{os.getpid()}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}",
        pool_cls="threads",
        concurrency=concurrency,
        queues=list(queues),
        loglevel=loglevel,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    thread = threading.Thread(
        target=controller.start, name=f"celery-{controller.hostname}", daemon=True
    )
    thread.start()
    if not controller.started.wait(ready_timeout):
        controller.stop(in_sighandler=False)
        raise RuntimeError(f"celery worker did not start within {ready_timeout}s")
    log.info("celery worker started", extra={"hostname": controller.hostname, "queues": queues})
    return WorkerThread(controller, thread)


def __getattr__(name: str) -> Celery:
    """``app`` for ``celery -A registry_svc.worker``: built on first use, from the environment."""
    if name == "app":
        settings = RegistrySettings()
        app = make_celery(settings.common, settings=settings)
        globals()["app"] = app
        return app
    raise AttributeError(name)
