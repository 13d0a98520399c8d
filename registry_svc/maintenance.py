"""Background upkeep of the registry process, every ``maintenance_interval_s``:
re-send stalled ingestions, prune the change log, collect orphan blobs and stale spools."""

from __future__ import annotations

import asyncio
import logging

from registry_svc.context import RegistryContext
from registry_svc.ingest_dispatch import requeue_stalled
from registry_svc.lifecycle import gc_blobs
from registry_svc.store import prune_events

log = logging.getLogger("loraserve.registry.maintenance")


def run_once(ctx: RegistryContext) -> dict[str, int]:
    s = ctx.settings
    return {
        "requeued": requeue_stalled(ctx.celery, ctx.db, s.ingest_stall_s),
        "events_pruned": prune_events(ctx.db, s.event_retention_s),
        "blobs_collected": len(gc_blobs(ctx, s.blob_gc_grace_s)),
        "spools_removed": ctx.blobs.cleanup_tmp(s.blob_gc_grace_s),
    }


async def maintenance_loop(ctx: RegistryContext) -> None:
    while True:
        try:
            stats = await asyncio.to_thread(run_once, ctx)
            if any(stats.values()):
                log.info("maintenance", extra=stats)
        except Exception:  # noqa: BLE001 - keep the loop alive; next round retries
            log.exception("maintenance round failed")
        await asyncio.sleep(ctx.settings.maintenance_interval_s)
