"""Push → PENDING → VALIDATING → EMBEDDING → READY through the real stub and a real Celery
worker, with the Redis broker and with the embedded SQLite broker; the adapter's centroid is
then searchable in Qdrant."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from registry_helpers import BASE, SAMPLES, R, S

from loraserve import vectors as V
from loraserve.api.v1 import jobs_pb2
from registry_svc.vector_index import centroid

pytestmark = pytest.mark.parametrize("stack", ["embedded", "redis"], indirect=True)


async def test_push_becomes_ready_and_searchable(stack, registry, adapter_factory, embedder):
    adapter_dir = adapter_factory("fr", rank=4, alpha=8, seed=11)
    async with registry() as client:
        watch = client.registry.WatchAdapters(
            R.WatchAdaptersRequest(
                filter=R.AdapterFilter(adapter_id_prefix="fr-translate"), send_initial_state=True
            )
        )
        first = await watch.read()
        assert first.type == R.ADAPTER_EVENT_TYPE_SNAPSHOT_END

        resp = await client.push("fr-translate", adapter_dir, tags=["lang", "fr"], domain="mt")
        assert resp.adapter.version == 1
        assert resp.adapter.status == S.ADAPTER_STATUS_PENDING
        ready = await client.wait("fr-translate", 1)
        assert ready.status == S.ADAPTER_STATUS_READY, ready.failure_reason

        statuses = []
        while not statuses or statuses[-1] != S.ADAPTER_STATUS_READY:
            event = await asyncio.wait_for(watch.read(), 10)
            assert event.type == R.ADAPTER_EVENT_TYPE_UPDATED
            statuses.append(event.adapter.status)
        watch.cancel()
        assert statuses == [
            S.ADAPTER_STATUS_PENDING,
            S.ADAPTER_STATUS_VALIDATING,
            S.ADAPTER_STATUS_EMBEDDING,
            S.ADAPTER_STATUS_READY,
        ]

        job = (await client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=resp.job_id))).job
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.kind == jobs_pb2.JOB_KIND_INGEST

    meta = ready.metadata
    assert (meta.base_model, meta.rank, meta.lora_alpha, meta.dtype) == (BASE, 4, 8.0, "float32")
    assert meta.tags == ["fr", "lang"] and meta.domain == "mt"
    assert meta.sample_inputs_count == len(SAMPLES)
    assert len(meta.module_scales) == 2 * 7  # 2 layers x 7 projections
    assert {m.scale for m in meta.module_scales} == {2.0}
    assert sorted(f.name for f in meta.files) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert meta.sha256 == next(f.sha256 for f in meta.files if f.name.endswith("safetensors"))

    # The centroid is the nearest point to a sample prompt, with the schema's payload.
    client_q = V.open_qdrant(stack.common)
    collection = V.active_collection(client_q)
    assert collection == V.collection_name(embedder.model_id)
    query = embedder.embed(["Translate to French: I like apples."]).vectors[0]
    hits = client_q.query_points(
        collection,
        query=query.tolist(),
        query_filter=V_filter(kind=V.KIND_CENTROID, base_model=BASE),
        limit=1,
        with_payload=True,
        with_vectors=True,
    ).points
    assert hits and hits[0].id == V.centroid_point_id("fr-translate", 1)
    payload = hits[0].payload
    assert payload[V.P_ADAPTER_ID] == "fr-translate" and payload[V.P_STATUS] == V.STATUS_READY
    assert payload[V.P_TAGS] == ["fr", "lang"] and payload[V.P_DOMAIN] == "mt"
    expected = centroid(embedder.embed(SAMPLES).vectors)
    np.testing.assert_allclose(hits[0].vector, expected, atol=1e-5)
    assert stack.points_of("fr-translate") == 1 + len(SAMPLES)


def V_filter(**match: str):  # noqa: N802 - reads as a constructor
    from qdrant_client import models

    return models.Filter(
        must=[
            models.FieldCondition(key=k, match=models.MatchValue(value=v)) for k, v in match.items()
        ]
    )
