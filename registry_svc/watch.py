"""WatchAdapters: a snapshot, then live changes, from any process's writes.

The worker that changes statuses may be another process, so watchers do not rely on in-memory
notification: they poll the change log (``adapter_events``, one row per change, ordered by
``seq``) every ``watch_poll_interval_s`` (150 ms by default). One indexed range query per poll
per watcher; events carry the adapter as it was, so a watcher sees every state in order, and
the snapshot and its ``seq`` come from one read transaction, so nothing falls between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from sqlalchemy import func, select

from loraserve.api.v1 import common_pb2, registry_pb2
from registry_svc.context import RegistryContext
from registry_svc.convert import adapter_to_proto, status_name
from registry_svc.db import Database
from registry_svc.models import EventRow
from registry_svc.store import EVENT_DELETED, AdapterQuery, events_after, snapshot

R = registry_pb2


def last_seq(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.max(EventRow.seq))) or 0)


def _wanted(query: AdapterQuery, event_type: str, adapter: common_pb2.Adapter) -> bool:
    if event_type == EVENT_DELETED:  # a watcher must hear that a matching adapter went away
        query = AdapterQuery(
            base_model=query.base_model,
            tags=query.tags,
            domain=query.domain,
            adapter_id_prefix=query.adapter_id_prefix,
            include_deleted=True,
        )
    return query.matches(adapter, status_name(adapter.status))


async def watch_adapters(
    ctx: RegistryContext, query: AdapterQuery, send_initial_state: bool
) -> AsyncIterator[registry_pb2.WatchAdaptersResponse]:
    """Runs until the client cancels (or the server stops)."""
    db = ctx.db
    if send_initial_state:
        seq, rows = await asyncio.to_thread(snapshot, db, query)
        for row in rows:
            yield R.WatchAdaptersResponse(
                type=R.ADAPTER_EVENT_TYPE_SNAPSHOT, adapter=adapter_to_proto(row), sequence=seq
            )
        yield R.WatchAdaptersResponse(type=R.ADAPTER_EVENT_TYPE_SNAPSHOT_END, sequence=seq)
    else:
        seq = await asyncio.to_thread(last_seq, db)
    limit = 500
    while True:
        events = await asyncio.to_thread(events_after, db, seq, limit)
        for ev in events:
            seq = ev.seq
            adapter = common_pb2.Adapter.FromString(ev.payload)
            if _wanted(query, ev.event_type, adapter):
                kind = (
                    R.ADAPTER_EVENT_TYPE_DELETED
                    if ev.event_type == EVENT_DELETED
                    else R.ADAPTER_EVENT_TYPE_UPDATED
                )
                yield R.WatchAdaptersResponse(type=kind, adapter=adapter, sequence=ev.seq)
        if len(events) < limit:
            await asyncio.sleep(ctx.settings.watch_poll_interval_s)
