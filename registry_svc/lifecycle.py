"""Deleting adapters, re-running ingestion, collecting blobs no record uses."""

from __future__ import annotations

from loraserve.errors import FailedPrecondition, NotFound
from registry_svc.context import RegistryContext
from registry_svc.convert import DELETED, FAILED, PENDING, READY
from registry_svc.ingest_dispatch import dispatch_ingest, send_delete_points
from registry_svc.jobs import JobRecord
from registry_svc.models import AdapterRow
from registry_svc.store import ACTIVE, get_adapter, mark_deleted, referenced_blobs, transition


def delete_versions(ctx: RegistryContext, adapter_id: str, version: int) -> list[AdapterRow]:
    """Soft-delete (one version, or all when 0), drop blobs no live record uses, and send the
    Qdrant point deletion to the worker (the registry process never opens Qdrant)."""
    with ctx.blobs.lock:
        rows = mark_deleted(ctx.db, adapter_id, version)
        if not rows:
            what = f"{adapter_id}@{version}" if version else adapter_id
            raise NotFound(
                f"adapter {what} not found (or already deleted)",
                resource_type="adapter",
                resource_name=what,
            )
        candidates = {f["sha256"] for row in rows for f in row.files}
        ctx.blobs.delete_unreferenced(referenced_blobs(ctx.db), candidates=candidates)
    send_delete_points(ctx.celery, adapter_id, [row.version for row in rows])
    return rows


def restart_ingest(ctx: RegistryContext, adapter_id: str, version: int) -> JobRecord:
    """StartIngest: back to PENDING with a new run number, and a new ingest job."""
    row = get_adapter(ctx.db, adapter_id, version)
    if row is None:
        what = f"{adapter_id}@{version}" if version else adapter_id
        raise NotFound(f"adapter {what} not found", resource_type="adapter", resource_name=what)
    if row.status == DELETED:
        raise FailedPrecondition(f"adapter {adapter_id}@{row.version} is deleted")
    updated = transition(ctx.db, row.pk, PENDING, bump_run=True, expect=ACTIVE | {READY, FAILED})
    if updated is None:
        raise FailedPrecondition(f"adapter {adapter_id}@{row.version} was deleted meanwhile")
    return dispatch_ingest(ctx.celery, ctx.db, updated)


def gc_blobs(ctx: RegistryContext, grace_s: float) -> list[str]:
    """Delete every blob no live record uses and older than ``grace_s``."""
    with ctx.blobs.lock:
        return ctx.blobs.delete_unreferenced(referenced_blobs(ctx.db), grace_s=grace_s)
