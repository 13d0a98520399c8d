"""Celery tasks of queue ``ingest``: adapter ingestion and Qdrant point deletion.

Task ids are deterministic (the ingest job id, see :mod:`registry_svc.ingest_dispatch`), tasks
are acknowledged late and rejected (redelivered) when their worker dies, and only transient
errors (database busy, Qdrant or network unreachable) are retried, with capped exponential
backoff; anything else fails the adapter with its reason.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from qdrant_client.http.exceptions import ResponseHandlingException
from sqlalchemy.exc import OperationalError

from loraserve import vectors as V
from loraserve.embedding import shared_embedder
from registry_svc.ingest import PermanentIngestError, fail_ingest, run_ingest
from registry_svc.settings import RegistrySettings
from registry_svc.vector_index import delete_adapter
from registry_svc.worker import TASK_DELETE_POINTS, TASK_INGEST

log = logging.getLogger("loraserve.registry.tasks")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    ResponseHandlingException,
    ConnectionError,
    TimeoutError,
)


def _settings(task: Any) -> RegistrySettings:
    return getattr(task.app, "loraserve_settings", None) or RegistrySettings()


def _backoff(retries: int, cap: float) -> float:
    return min(cap, 2.0**retries) * (0.5 + random.random() / 2)


@shared_task(name=TASK_INGEST, bind=True, acks_late=True, reject_on_worker_lost=True)
def ingest_adapter(self: Any, adapter_id: str, version: int, job_id: str) -> str:
    """Validate, embed and index one adapter version (see registry_svc.ingest)."""
    settings = _settings(self)
    try:
        return run_ingest(settings, adapter_id, version, job_id)
    except PermanentIngestError as exc:
        fail_ingest(settings, adapter_id, version, job_id, str(exc))
        return "failed"
    except TRANSIENT_ERRORS as exc:
        if self.request.retries >= settings.ingest_max_retries:
            reason = f"gave up after {self.request.retries} retries: {type(exc).__name__}: {exc}"
            fail_ingest(settings, adapter_id, version, job_id, reason)
            return "failed"
        countdown = _backoff(self.request.retries, settings.ingest_retry_backoff_max_s)
        log.warning(
            "ingest %s@%s: transient %r, retry in %.1fs", adapter_id, version, exc, countdown
        )
        raise self.retry(exc=exc, countdown=countdown) from None
    except Exception as exc:
        log.exception("ingest %s@%s failed", adapter_id, version)
        fail_ingest(
            settings, adapter_id, version, job_id, f"internal error: {type(exc).__name__}: {exc}"
        )
        return "failed"


@shared_task(
    name=TASK_DELETE_POINTS,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=10,
)
def delete_adapter_points(self: Any, adapter_id: str, versions: list[int]) -> int:
    """Remove the Qdrant points of these versions (DeleteAdapter)."""
    if not versions:
        return 0
    delete_adapter(V.open_qdrant(_settings(self).common), adapter_id, list(versions))
    return len(versions)


@worker_ready.connect
def _preload_embedder(sender: Any = None, **_: Any) -> None:
    """Load the embedding model when a worker starts, not on its first ingestion."""
    settings = getattr(getattr(sender, "app", None), "loraserve_settings", None)
    if settings is None:
        return
    model = settings.common.embedding_model or None
    threading.Thread(target=shared_embedder, args=(model,), daemon=True).start()
