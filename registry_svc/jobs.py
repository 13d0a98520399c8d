"""The job store: records of asynchronous work (ingestion, retriever and gate training).

Status lives here, not in Celery results. Celery tasks, in whatever process they run, report
through :func:`update_job`; JobService reads the same rows (GetJob, WatchJob polls
``revision``). Tasks that need the pool read it through :func:`ready_adapters_with_samples`.

Example (inside a Celery task)::

    from registry_svc.jobs import update_job
    update_job(common, job_id, state="RUNNING", progress=0.3, message="epoch 1/3")
    update_job(common, job_id, state="SUCCEEDED", progress=1.0, metrics={"top1": 0.81},
               result="adapters__minilm_ft_1234")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import select

from loraserve.settings import CommonSettings
from registry_svc.db import Database, open_database
from registry_svc.models import AdapterRow, JobRow

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "PENDING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
)
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

KIND_INGEST = "INGEST"
KIND_TRAIN_RETRIEVER = "TRAIN_RETRIEVER"
KIND_TRAIN_GATE = "TRAIN_GATE"


@dataclass(slots=True)
class JobRecord:
    job_id: str
    kind: str
    state: str
    progress: float = 0.0
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    result: str = ""
    adapter_id: str | None = None
    version: int | None = None
    revision: int = 0
    create_time: float = 0.0
    update_time: float = 0.0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


def _record(row: JobRow) -> JobRecord:
    return JobRecord(
        job_id=row.job_id,
        kind=row.kind,
        state=row.state,
        progress=row.progress,
        message=row.message,
        metrics=dict(row.metrics or {}),
        result=row.result,
        adapter_id=row.adapter_id,
        version=row.version,
        revision=row.revision,
        create_time=row.create_time,
        update_time=row.update_time,
    )


def create_job(
    db: Database,
    job_id: str,
    kind: str,
    *,
    adapter_id: str | None = None,
    version: int | None = None,
    message: str = "queued",
) -> JobRecord:
    """Insert a PENDING job; an existing job with this id is returned unchanged (idempotent)."""
    now = time.time()
    with db.write() as session:
        row = session.get(JobRow, job_id)
        if row is None:
            row = JobRow(
                job_id=job_id,
                kind=kind,
                state=PENDING,
                message=message,
                metrics={},
                result="",
                adapter_id=adapter_id,
                version=version,
                revision=0,
                create_time=now,
                update_time=now,
            )
            session.add(row)
            session.flush()
        return _record(row)


def get_job(db: Database, job_id: str) -> JobRecord | None:
    with db.read() as session:
        row = session.get(JobRow, job_id)
        return _record(row) if row is not None else None


def set_job(
    db: Database,
    job_id: str,
    *,
    state: str | None = None,
    progress: float | None = None,
    message: str | None = None,
    metrics: dict[str, float] | None = None,
    result: str | None = None,
) -> JobRecord:
    """:func:`update_job` on an open Database."""
    if state is not None and state not in STATES:
        raise ValueError(f"unknown job state {state!r}; expected one of {', '.join(STATES)}")
    with db.write() as session:
        row = session.get(JobRow, job_id)
        if row is None:
            raise KeyError(f"no job {job_id!r}")
        if state is not None:
            row.state = state
        if progress is not None:
            row.progress = min(1.0, max(0.0, float(progress)))
        if message is not None:
            row.message = message
        if metrics:
            row.metrics = {**(row.metrics or {}), **{k: float(v) for k, v in metrics.items()}}
        if result is not None:
            row.result = result
        row.revision += 1
        row.update_time = time.time()
        session.flush()
        return _record(row)


def update_job(
    common: CommonSettings,
    job_id: str,
    *,
    state: str | None = None,
    progress: float | None = None,
    message: str | None = None,
    metrics: dict[str, float] | None = None,
    result: str | None = None,
) -> JobRecord:
    """Report on a job from any process. Fields left None are unchanged; metrics are merged.

    ``state`` is one of PENDING, RUNNING, SUCCEEDED, FAILED (or CANCELLED); ``progress`` is
    clamped to 0..1. Raises KeyError for an unknown job id, ValueError for an unknown state.
    """
    return set_job(
        open_database(common),
        job_id,
        state=state,
        progress=progress,
        message=message,
        metrics=metrics,
        result=result,
    )


def ready_adapters_with_samples(
    common: CommonSettings, base_model: str
) -> list[tuple[str, int, str, list[str], list[str]]]:
    """Every READY adapter version of ``base_model`` as
    ``(adapter_id, version, domain, tags, sample_inputs)``, ordered by id then version."""
    db = open_database(common)
    with db.read() as session:
        rows = session.execute(
            select(
                AdapterRow.adapter_id,
                AdapterRow.version,
                AdapterRow.domain,
                AdapterRow.tags,
                AdapterRow.sample_inputs,
            )
            .where(AdapterRow.base_model == base_model, AdapterRow.status == "READY")
            .order_by(AdapterRow.adapter_id, AdapterRow.version)
        ).all()
    return [(a, v, d, list(t or []), list(s or [])) for a, v, d, t, s in rows]
