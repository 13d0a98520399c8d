"""Transient errors are retried (capped, with backoff) and then fail the adapter with the
reason; here the worker's Qdrant server is unreachable (a closed port)."""

from __future__ import annotations

import pytest
from registry_helpers import S, close_stack, make_stack

from loraserve.api.v1 import jobs_pb2
from registry_svc.worker import start_worker_thread


@pytest.fixture(scope="module")
def stack(tmp_path_factory, embedder):
    st = make_stack(
        tmp_path_factory.mktemp("registry-retries"),
        qdrant_url="http://127.0.0.1:9",  # discard port: nothing listens
        ingest_max_retries=2,
        ingest_retry_backoff_max_s=0,
    )
    try:
        st.worker = start_worker_thread(st.celery, ("ingest",), concurrency=1)
        yield st
    finally:
        close_stack(st)


async def test_unreachable_qdrant_is_retried_then_fails(stack, registry, adapter_factory):
    async with registry() as client:
        resp = await client.push("no-qdrant", adapter_factory("nq", rank=2))
        failed = await client.wait("no-qdrant", timeout=60)
        assert failed.status == S.ADAPTER_STATUS_FAILED
        assert failed.failure_reason.startswith("gave up after 2 retries"), failed.failure_reason
        job = (await client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=resp.job_id))).job
        assert job.state == jobs_pb2.JOB_STATE_FAILED and "gave up" in job.message
