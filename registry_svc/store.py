"""Adapter records: versions, the status state machine, queries, and the change log.

Every change to a record writes one ``adapter_events`` row in the same transaction, carrying
the serialized ``Adapter`` as it now is. Watchers in any process poll that log by ``seq``
(:mod:`registry_svc.watch`). ``seq`` order must equal commit order for a poller never to skip
a row: SQLite serialises writers already; on PostgreSQL the event insert takes a table lock
(writers of the registry are few; readers are not blocked).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, exists, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loraserve.errors import AlreadyExists
from registry_svc.convert import (
    DELETED,
    EMBEDDING,
    FAILED,
    PENDING,
    READY,
    VALIDATING,
    adapter_to_proto,
)
from registry_svc.db import Database
from registry_svc.models import AdapterRow, EventRow, TagRow

EVENT_UPDATED, EVENT_DELETED = "UPDATED", "DELETED"
# Ingestion has not finished with these.
ACTIVE = frozenset({PENDING, VALIDATING, EMBEDDING})


@dataclass(slots=True)
class NewAdapter:
    """A validated upload, ready to become a PENDING record."""

    adapter_id: str
    version: int  # 0 = next
    base_model: str
    files: list[dict[str, Any]]
    sha256: str
    size_bytes: int
    rank: int = 0
    lora_alpha: float = 0.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)
    module_scales: list[list[Any]] = field(default_factory=list)
    dtype: str = ""
    tags: list[str] = field(default_factory=list)
    domain: str = ""
    description: str = ""
    sample_inputs: list[str] = field(default_factory=list)


@dataclass(slots=True)
class AdapterQuery:
    """AdapterFilter in store terms; empty fields match everything."""

    base_model: str = ""
    statuses: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    domain: str = ""
    adapter_id_prefix: str = ""
    include_deleted: bool = False

    def matches(self, row_or_msg: Any, status: str) -> bool:
        """The same test in Python, for watch events (``row_or_msg`` is an Adapter message)."""
        meta = row_or_msg.metadata
        return (
            (not self.base_model or meta.base_model == self.base_model)
            and (not self.statuses or status in self.statuses)
            and (self.include_deleted or status != DELETED or bool(self.statuses))
            and set(self.tags) <= set(meta.tags)
            and (not self.domain or meta.domain == self.domain)
            and row_or_msg.adapter_id.startswith(self.adapter_id_prefix)
        )


def _log(session: Session, db: Database, row: AdapterRow, event_type: str = EVENT_UPDATED) -> None:
    if db.is_postgres:
        session.execute(text("LOCK TABLE adapter_events IN SHARE ROW EXCLUSIVE MODE"))
    session.flush()
    payload = adapter_to_proto(row).SerializeToString()
    session.add(EventRow(time=time.time(), event_type=event_type, payload=payload))


def create_adapter(db: Database, new: NewAdapter) -> AdapterRow:
    """Insert a PENDING record; version 0 takes the next number (deleted versions included,
    so a version number is never reused). AlreadyExists when an explicit version is taken."""
    for _ in range(5):
        try:
            with db.write() as session:
                version = new.version or _next_version(session, new.adapter_id)
                if session.scalar(
                    select(AdapterRow.pk).where(
                        AdapterRow.adapter_id == new.adapter_id, AdapterRow.version == version
                    )
                ):
                    raise AlreadyExists(f"adapter {new.adapter_id!r} version {version} exists")
                now = time.time()
                row = AdapterRow(
                    adapter_id=new.adapter_id,
                    version=version,
                    status=PENDING,
                    failure_reason="",
                    base_model=new.base_model,
                    domain=new.domain,
                    description=new.description,
                    tags=list(new.tags),
                    sample_inputs=list(new.sample_inputs),
                    rank=new.rank,
                    lora_alpha=new.lora_alpha,
                    use_rslora=new.use_rslora,
                    target_modules=list(new.target_modules),
                    module_scales=list(new.module_scales),
                    dtype=new.dtype,
                    size_bytes=new.size_bytes,
                    sha256=new.sha256,
                    files=list(new.files),
                    ingest_runs=1,
                    create_time=now,
                    update_time=now,
                )
                session.add(row)
                session.flush()
                session.add_all(TagRow(adapter_pk=row.pk, tag=t) for t in set(new.tags))
                _log(session, db, row)
                return row
        except IntegrityError:  # a concurrent push took the same auto version: try the next
            if new.version:
                raise AlreadyExists(
                    f"adapter {new.adapter_id!r} version {new.version} exists"
                ) from None
    raise AlreadyExists(f"adapter {new.adapter_id!r}: could not allocate a version")


def _next_version(session: Session, adapter_id: str) -> int:
    top = session.scalar(
        select(func.max(AdapterRow.version)).where(AdapterRow.adapter_id == adapter_id)
    )
    return (top or 0) + 1


def get_adapter(
    db: Database, adapter_id: str, version: int = 0, *, ready_only: bool = False
) -> AdapterRow | None:
    """One version; version 0 = the latest one that is not deleted (READY with ready_only)."""
    with db.read() as session:
        q = select(AdapterRow).where(AdapterRow.adapter_id == adapter_id)
        if version:
            q = q.where(AdapterRow.version == version)
        elif ready_only:
            q = q.where(AdapterRow.status == READY)
        else:
            q = q.where(AdapterRow.status != DELETED)
        return session.scalar(q.order_by(AdapterRow.version.desc()).limit(1))


def _filtered(q, query: AdapterQuery):  # noqa: ANN001, ANN202 - a Select either way
    if query.base_model:
        q = q.where(AdapterRow.base_model == query.base_model)
    if query.statuses:
        q = q.where(AdapterRow.status.in_(query.statuses))
    elif not query.include_deleted:
        q = q.where(AdapterRow.status != DELETED)
    if query.domain:
        q = q.where(AdapterRow.domain == query.domain)
    if query.adapter_id_prefix:
        q = q.where(AdapterRow.adapter_id.startswith(query.adapter_id_prefix, autoescape=True))
    for tag in set(query.tags):
        q = q.where(exists().where(TagRow.adapter_pk == AdapterRow.pk, TagRow.tag == tag))
    return q


def list_adapters(
    db: Database, query: AdapterQuery, *, after: tuple[str, int] | None, limit: int
) -> tuple[list[AdapterRow], int]:
    """A page in (adapter_id, version) order, keyset-paginated after ``after``; and the total."""
    with db.read() as session:
        total = session.scalar(_filtered(select(func.count(AdapterRow.pk)), query)) or 0
        q = _filtered(select(AdapterRow), query)
        if after is not None:
            a, v = after
            q = q.where(
                (AdapterRow.adapter_id > a)
                | ((AdapterRow.adapter_id == a) & (AdapterRow.version > v))
            )
        rows = session.scalars(
            q.order_by(AdapterRow.adapter_id, AdapterRow.version).limit(limit)
        ).all()
        return list(rows), int(total)


def snapshot(db: Database, query: AdapterQuery) -> tuple[int, list[AdapterRow]]:
    """Every matching record and the change-log position they reflect (one read snapshot)."""
    with db.read() as session:
        seq = session.scalar(select(func.max(EventRow.seq))) or 0
        rows = session.scalars(
            _filtered(select(AdapterRow), query).order_by(AdapterRow.adapter_id, AdapterRow.version)
        ).all()
        return int(seq), list(rows)


def transition(
    db: Database,
    pk: int,
    status: str,
    *,
    reason: str = "",
    expect: frozenset[str] | None = None,
    bump_run: bool = False,
) -> AdapterRow | None:
    """Move a record to ``status`` if its status is in ``expect`` (any when None).
    Returns the updated row, or None when the record is gone or in another state."""
    with db.write() as session:
        row = session.get(AdapterRow, pk)
        if row is None or (expect is not None and row.status not in expect):
            return None
        row.status = status
        row.failure_reason = reason
        row.update_time = time.time()
        if bump_run:
            row.ingest_runs += 1
        _log(session, db, row, EVENT_DELETED if status == DELETED else EVENT_UPDATED)
        return row


def get_by_pk(db: Database, pk: int) -> AdapterRow | None:
    with db.read() as session:
        return session.get(AdapterRow, pk)


def mark_deleted(db: Database, adapter_id: str, version: int = 0) -> list[AdapterRow]:
    """Soft-delete one version (or every version when 0); returns the rows deleted now."""
    with db.write() as session:
        q = select(AdapterRow).where(
            AdapterRow.adapter_id == adapter_id, AdapterRow.status != DELETED
        )
        if version:
            q = q.where(AdapterRow.version == version)
        rows = list(session.scalars(q.order_by(AdapterRow.version)).all())
        now = time.time()
        for row in rows:
            row.status = DELETED
            row.failure_reason = ""
            row.update_time = now
            _log(session, db, row, EVENT_DELETED)
        return rows


def referenced_blobs(db: Database) -> set[str]:
    """sha256 of every file of every record that is not deleted."""
    with db.read() as session:
        files = session.scalars(select(AdapterRow.files).where(AdapterRow.status != DELETED))
        return {f["sha256"] for fs in files for f in (fs or [])}


def events_after(db: Database, seq: int, limit: int = 500) -> list[EventRow]:
    with db.read() as session:
        return list(
            session.scalars(
                select(EventRow).where(EventRow.seq > seq).order_by(EventRow.seq).limit(limit)
            ).all()
        )


def prune_events(db: Database, older_than_s: float) -> int:
    with db.write() as session:
        res = session.execute(delete(EventRow).where(EventRow.time < time.time() - older_than_s))
        return int(res.rowcount or 0)


def set_failed_if_active(db: Database, pk: int, reason: str) -> AdapterRow | None:
    """FAILED unless the record already ended (READY, FAILED, DELETED)."""
    return transition(db, pk, FAILED, reason=reason, expect=ACTIVE)
