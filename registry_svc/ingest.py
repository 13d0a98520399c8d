"""Ingestion of one adapter version: VALIDATING → EMBEDDING → READY | FAILED(reason).

Runs inside a Celery task (:mod:`registry_svc.tasks`), in the process that may open Qdrant.
Idempotent: a record already READY (or DELETED) is left alone; points have deterministic ids,
so a second run of a half-finished ingestion overwrites the first one's points. The upload was
validated when it was pushed; here the blobs are re-hashed (integrity of the store) and
re-validated, so a re-run after a registry upgrade or a corrupted disk cannot go READY on bad
weights.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from qdrant_client import QdrantClient

from loraserve import vectors as V
from loraserve.embedding import Embedder, shared_embedder
from loraserve.errors import InvalidArgument
from loraserve.settings import CommonSettings
from registry_svc import jobs
from registry_svc.basemodels import get_base_model
from registry_svc.blobstore import BlobStore
from registry_svc.convert import DELETED, EMBEDDING, READY, VALIDATING
from registry_svc.db import Database, open_database
from registry_svc.names import CONFIG_FILE, WEIGHTS_FILE
from registry_svc.settings import RegistrySettings
from registry_svc.store import ACTIVE, get_adapter, get_by_pk, set_failed_if_active, transition
from registry_svc.validation import validate_adapter
from registry_svc.vector_index import delete_adapter, prepare_collection, upsert_adapter

log = logging.getLogger("loraserve.registry.ingest")


class PermanentIngestError(Exception):
    """The adapter cannot become READY; retrying will not help."""


def run_ingest(settings: RegistrySettings, adapter_id: str, version: int, job_id: str) -> str:
    """Ingest one version; returns what happened ("ready", "already ready", "deleted", ...).
    Raises PermanentIngestError (caller marks FAILED) or a transient error (caller retries)."""
    common = settings.common
    db = open_database(common)
    row = get_adapter(db, adapter_id, version)
    if row is None:
        _job(db, job_id, jobs.FAILED, "adapter record not found")
        return "missing"
    if row.status == READY:
        _job(db, job_id, jobs.SUCCEEDED, "already READY", progress=1.0)
        return "already ready"
    if row.status not in ACTIVE:  # DELETED, or FAILED by an earlier run
        _job(db, job_id, jobs.CANCELLED, f"adapter is {row.status}")
        return row.status.lower()
    _job(db, job_id, jobs.RUNNING, "validating", progress=0.1)
    if transition(db, row.pk, VALIDATING, expect=ACTIVE) is None:
        return "raced"
    if settings.test_ingest_delay_s:
        time.sleep(settings.test_ingest_delay_s)

    blobs = BlobStore(settings.resolved_blob_dir)
    files = {f["name"]: f for f in row.files}
    paths = {name: blobs.path_for(f["sha256"]) for name, f in files.items()}
    for name, f in files.items():
        if not paths[name].is_file() or _sha256(paths[name]) != f["sha256"]:
            raise PermanentIngestError(f"blob of {name} is missing or corrupted in the store")
    base = get_base_model(db, row.base_model)
    if base is None:
        raise PermanentIngestError(f"base model {row.base_model!r} is not registered")
    try:
        validate_adapter(
            paths[CONFIG_FILE].read_bytes(),
            paths[WEIGHTS_FILE],
            base,
            max_rank=settings.max_rank,
            max_header_bytes=settings.max_header_bytes,
        )
    except InvalidArgument as exc:
        raise PermanentIngestError(f"validation failed: {exc.message}") from None

    if transition(db, row.pk, EMBEDDING, expect=ACTIVE) is None:
        return "raced"
    _job(db, job_id, jobs.RUNNING, "embedding sample inputs", progress=0.4)
    client = V.open_qdrant(common)
    collection, embedder = target_index(common, client)
    vectors = embedder.embed(list(row.sample_inputs)).vectors
    _job(db, job_id, jobs.RUNNING, "writing vectors", progress=0.7)
    upsert_adapter(
        client,
        collection,
        adapter_id=row.adapter_id,
        version=row.version,
        base_model=row.base_model,
        tags=list(row.tags or []),
        domain=row.domain,
        sample_embeddings=vectors,
    )
    if transition(db, row.pk, READY, expect=ACTIVE) is None:
        current = get_by_pk(db, row.pk)
        if current is None or current.status == DELETED:  # deleted while we embedded
            delete_adapter(client, row.adapter_id, [row.version])
            _job(db, job_id, jobs.CANCELLED, "adapter was deleted during ingestion")
            return "deleted"
        if current.status == READY:  # a concurrent run finished first
            _job(db, job_id, jobs.SUCCEEDED, "READY", progress=1.0)
            return "already ready"
        raise PermanentIngestError(f"record moved to {current.status} during ingestion")
    _job(db, job_id, jobs.SUCCEEDED, "READY", progress=1.0)
    log.info("adapter ready", extra={"adapter_id": adapter_id, "version": version})
    return "ready"


def target_index(common: CommonSettings, client: QdrantClient) -> tuple[str, Embedder]:
    """The collection to write to and the model that embeds for it: the active collection
    with the model its metadata names (a retrained one), else — first ingestion — the default
    model's collection, which becomes active."""
    active = V.active_collection(client)
    if active is None:
        embedder = shared_embedder(common.embedding_model or None)
        name = V.collection_name(embedder.model_id)
        prepare_collection(client, name, embedder.dim)
        return name, embedder
    _, model_dir = V.collection_model(client, active)
    return active, shared_embedder(model_dir or common.embedding_model or None)


def fail_ingest(
    settings: RegistrySettings, adapter_id: str, version: int, job_id: str, reason: str
) -> None:
    """Record a final failure on the adapter (unless it already ended) and on the job."""
    db = open_database(settings.common)
    row = get_adapter(db, adapter_id, version)
    if row is not None:
        set_failed_if_active(db, row.pk, reason)
    _job(db, job_id, jobs.FAILED, reason)


def _job(
    db: Database, job_id: str, state: str, message: str, progress: float | None = None
) -> None:
    try:
        jobs.set_job(db, job_id, state=state, message=message, progress=progress)
    except KeyError:  # job rows are best effort: the adapter record is the source of truth
        log.warning("ingest job %s not found", job_id)


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()
