"""The registry process's side of Celery: create job records, send tasks, re-send stalled ones.

Job ids double as Celery task ids and are deterministic: ``ingest-<adapter_id>-v<version>-r<run>``
where ``run`` counts StartIngest re-runs. Sending the same ingestion twice (a sweep, a retried
RPC) therefore targets the same job, and the task itself is idempotent.
"""

from __future__ import annotations

import logging
import time

from celery import Celery
from sqlalchemy import select, update

from registry_svc import jobs
from registry_svc.db import Database
from registry_svc.models import AdapterRow
from registry_svc.store import ACTIVE
from registry_svc.worker import INGEST_QUEUE, TASK_DELETE_POINTS, TASK_INGEST

log = logging.getLogger("loraserve.registry.dispatch")


def ingest_job_id(adapter_id: str, version: int, run: int) -> str:
    return f"ingest-{adapter_id}-v{version}-r{run}"


def dispatch_ingest(celery: Celery, db: Database, row: AdapterRow) -> jobs.JobRecord:
    """Create the ingest job (PENDING) and send its task. A broker outage is logged, not
    raised: the record stays PENDING and :func:`requeue_stalled` sends it again later."""
    job_id = ingest_job_id(row.adapter_id, row.version, row.ingest_runs)
    job = jobs.create_job(
        db, job_id, jobs.KIND_INGEST, adapter_id=row.adapter_id, version=row.version
    )
    send_ingest(celery, row.adapter_id, row.version, job_id)
    return job


def send_ingest(celery: Celery, adapter_id: str, version: int, job_id: str) -> bool:
    try:
        celery.send_task(
            TASK_INGEST,
            kwargs={"adapter_id": adapter_id, "version": version, "job_id": job_id},
            task_id=job_id,
            queue=INGEST_QUEUE,
        )
        return True
    except Exception:  # noqa: BLE001 - any broker failure; the sweep re-sends
        log.exception("could not send ingestion of %s@%s; will retry", adapter_id, version)
        return False


def send_delete_points(celery: Celery, adapter_id: str, versions: list[int]) -> bool:
    try:
        celery.send_task(
            TASK_DELETE_POINTS,
            kwargs={"adapter_id": adapter_id, "versions": versions},
            task_id=f"delete-{adapter_id}-v{'-'.join(map(str, versions))}"[:200],
            queue=INGEST_QUEUE,
        )
        return True
    except Exception:  # noqa: BLE001
        log.exception("could not send point deletion of %s %s", adapter_id, versions)
        return False


def requeue_stalled(celery: Celery, db: Database, stall_s: float) -> int:
    """Re-send ingestion of records that have not moved for ``stall_s`` seconds.

    Covers a lost send (broker down during PushAdapter) and the embedded broker, which does not
    redeliver the task of a worker that died. Returns the number of tasks re-sent.
    """
    cutoff = time.time() - stall_s
    with db.write() as session:
        rows = session.execute(
            select(AdapterRow.pk, AdapterRow.adapter_id, AdapterRow.version, AdapterRow.ingest_runs)
            .where(AdapterRow.status.in_(ACTIVE), AdapterRow.update_time < cutoff)
            .limit(500)
        ).all()
        if rows:  # restart their clocks, so that one stall is re-sent once per period
            session.execute(
                update(AdapterRow)
                .where(AdapterRow.pk.in_([r.pk for r in rows]))
                .values(update_time=time.time())
            )
    for _, adapter_id, version, run in rows:
        job_id = ingest_job_id(adapter_id, version, run)
        jobs.create_job(db, job_id, jobs.KIND_INGEST, adapter_id=adapter_id, version=version)
        send_ingest(celery, adapter_id, version, job_id)
    if rows:
        log.warning("re-sent %d stalled ingestions", len(rows))
    return len(rows)
