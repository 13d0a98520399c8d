"""Versions, dedupe, download, delete (blobs + points), StartIngest, WatchJob, re-sent stalls."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from registry_helpers import SAMPLES, R, S

from loraserve.api.v1 import jobs_pb2
from loraserve.errors import parse_rpc_error
from registry_svc.db import open_database
from registry_svc.ingest_dispatch import requeue_stalled
from registry_svc.worker import make_celery

CFG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


async def _download(client, adapter_id: str, **kw) -> tuple[dict[str, bytes], list]:
    files: dict[str, bytearray] = {}
    starts = []
    async for msg in client.registry.DownloadAdapter(
        R.DownloadAdapterRequest(adapter_id=adapter_id, **kw)
    ):
        if msg.HasField("file_start"):
            starts.append(msg.file_start)
            files[msg.file_start.file.name] = bytearray()
        else:
            buf = files[msg.chunk.file_name]
            assert msg.chunk.offset == kw.get("offset", 0) + len(buf)
            buf.extend(msg.chunk.data)
    return {k: bytes(v) for k, v in files.items()}, starts


async def _code(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        await coro
    return info.value.code()


async def test_versions_dedupe_download_and_delete(stack, registry, adapter_factory):
    a1 = adapter_factory("v1", rank=4, seed=1)
    a2 = adapter_factory("v2", rank=8, seed=2)
    async with registry() as client:
        r1 = await client.push("multi", a1)
        r2 = await client.push("multi", a2)
        assert (r1.adapter.version, r2.adapter.version) == (1, 2)
        await client.wait("multi", 1)
        await client.wait("multi", 2)
        assert (await client.get("multi")).version == 2  # version 0 = latest

        # An explicit version that exists is refused, and its new blob does not stay behind.
        blobs = stack.blob_files()
        a3 = adapter_factory("v3", rank=2, seed=3)
        header = {"version": 2}
        assert await _code(client.push("multi", a3, **header)) == grpc.StatusCode.ALREADY_EXISTS
        assert stack.blob_files() == blobs

        # The same bytes under another name are stored once.
        r_copy = await client.push("multi-copy", a1)
        assert stack.blob_files() == blobs
        assert r_copy.adapter.metadata.sha256 == r1.adapter.metadata.sha256
        await client.wait("multi-copy")

        # Download: every file, in order, verified by sha256; then resume from an offset.
        got, starts = await _download(client, "multi", version=1, chunk_size=1000)
        assert [s.file.name for s in starts] == [CFG, WEIGHTS]
        for s in starts:
            assert got[s.file.name] == (a1 / s.file.name).read_bytes()
            assert hashlib.sha256(got[s.file.name]).hexdigest() == s.file.sha256
        tail, _ = await _download(client, "multi", version=1, file_name=WEIGHTS, offset=1234)
        assert tail[WEIGHTS] == (a1 / WEIGHTS).read_bytes()[1234:]
        latest, starts = await _download(client, "multi")
        assert starts[0].adapter.version == 2 and latest[WEIGHTS] == (a2 / WEIGHTS).read_bytes()
        for kw, code in [
            ({"offset": 5}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"file_name": "../x"}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"file_name": WEIGHTS, "offset": 1 << 30}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"version": 9}, grpc.StatusCode.NOT_FOUND),
        ]:
            assert await _code(_download(client, "multi", **kw)) == code, kw

        # Delete version 1: soft delete, a DELETED event, its unshared blob kept (multi-copy
        # uses the same bytes), its points removed by the worker.
        watch = client.registry.WatchAdapters(
            R.WatchAdaptersRequest(
                filter=R.AdapterFilter(adapter_id_prefix="multi"), send_initial_state=True
            )
        )
        snapshot = [await watch.read() for _ in range(4)]  # multi@1, multi@2, multi-copy@1, end
        assert [e.type for e in snapshot] == [R.ADAPTER_EVENT_TYPE_SNAPSHOT] * 3 + [
            R.ADAPTER_EVENT_TYPE_SNAPSHOT_END
        ]
        deleted = await client.registry.DeleteAdapter(
            R.DeleteAdapterRequest(adapter_id="multi", version=1)
        )
        assert [a.version for a in deleted.deleted] == [1]
        event = await asyncio.wait_for(watch.read(), 10)
        assert event.type == R.ADAPTER_EVENT_TYPE_DELETED and event.adapter.version == 1
        assert (await client.get("multi", 1)).status == S.ADAPTER_STATUS_DELETED
        assert stack.blob_files() == blobs
        listed = await client.registry.ListAdapters(
            R.ListAdaptersRequest(filter=R.AdapterFilter(adapter_id_prefix="multi"))
        )
        assert [(a.adapter_id, a.version) for a in listed.adapters] == [
            ("multi", 2),
            ("multi-copy", 1),
        ]
        assert await _code(_download(client, "multi", version=1)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        await _wait_points(stack, "multi", 1 + len(SAMPLES))  # only version 2's remain

        # Delete every version left: blobs nobody uses go, points go.
        await client.registry.DeleteAdapter(R.DeleteAdapterRequest(adapter_id="multi-copy"))
        await client.registry.DeleteAdapter(R.DeleteAdapterRequest(adapter_id="multi"))
        watch.cancel()
        assert stack.blob_files() == set()
        await _wait_points(stack, "multi", 0)
        await _wait_points(stack, "multi-copy", 0)
        assert await _code(client.get("multi")) == grpc.StatusCode.NOT_FOUND
        code = await _code(
            client.registry.DeleteAdapter(R.DeleteAdapterRequest(adapter_id="multi"))
        )
        assert code == grpc.StatusCode.NOT_FOUND
        # Version numbers are never reused.
        assert (await client.push("multi", a1)).adapter.version == 3
        await client.wait("multi", 3)


async def _wait_points(stack, adapter_id: str, expected: int, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if stack.points_of(adapter_id) == expected:
            return
        await asyncio.sleep(0.05)
    assert stack.points_of(adapter_id) == expected


async def test_start_ingest_and_watch_job(stack, registry, adapter_factory):
    async with registry() as client:
        pushed = await client.push("rerun", adapter_factory("rerun", rank=2))
        await client.wait("rerun")
        resp = await client.jobs.StartIngest(
            jobs_pb2.StartIngestRequest(adapter=S.AdapterRef(adapter_id="rerun"))
        )
        assert resp.job.job_id != pushed.job_id and resp.job.job_id.endswith("-r2")
        updates = [
            u.job
            async for u in client.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=resp.job.job_id))
        ]
        assert updates[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED and updates[-1].progress == 1.0
        assert [u.progress for u in updates] == sorted(u.progress for u in updates)
        assert (await client.wait("rerun")).status == S.ADAPTER_STATUS_READY
        assert stack.points_of("rerun") == 1 + len(SAMPLES)  # overwritten, not duplicated

        err = await _code(client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id="nope")))
        assert err == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            await client.jobs.TrainGate(jobs_pb2.TrainGateRequest(base_model="tiny-llama"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "gate training is not available yet" in info.value.details()


async def test_train_retriever_creates_job_and_sends_task(stack, registry):
    async with registry() as client:
        resp = await client.jobs.TrainRetriever(
            jobs_pb2.TrainRetrieverRequest(base_model="tiny-llama", epochs=2, seed=7)
        )
        job = (await client.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=resp.job.job_id))).job
        assert job.kind == jobs_pb2.JOB_KIND_TRAIN_RETRIEVER
        assert job.state == jobs_pb2.JOB_STATE_PENDING
    # The task waits on queue "train" (this module's worker consumes only "ingest").
    with stack.celery.connection_for_write() as conn:
        channel = conn.default_channel
        assert channel.queue_declare("train", passive=True).message_count == 1
        channel.queue_purge("train")


async def test_stalled_ingestion_is_sent_again(stack, registry, adapter_factory, tmp_path):
    """A push whose task never reached a worker (here: sent to another broker) is re-sent."""
    elsewhere = make_celery(stack.common.model_copy(update={"data_dir": tmp_path / "other"}))
    original, stack.celery = stack.celery, elsewhere
    try:
        async with registry() as client:
            await client.push("stalled", adapter_factory("stalled", rank=2))
            await asyncio.sleep(0.3)
            assert (await client.get("stalled")).status == S.ADAPTER_STATUS_PENDING
            sent = requeue_stalled(original, open_database(stack.common), stall_s=0)
            assert sent == 1
            assert (await client.wait("stalled")).status == S.ADAPTER_STATUS_READY
    finally:
        stack.celery = original


async def test_base_models(stack, registry, tiny_model_factory):
    async with registry() as client:
        for arch in ("mistral", "qwen2"):
            model_dir = tiny_model_factory(arch, num_heads=4, num_kv_heads=1)
            resp = await client.registry.RegisterBaseModel(
                R.RegisterBaseModelRequest(
                    base_model_id=f"tiny/{arch}",
                    config_json=(model_dir / "config.json").read_text(),
                )
            )
            got = await client.registry.GetBaseModel(
                R.GetBaseModelRequest(base_model_id=f"tiny/{arch}")
            )
            assert got.base_model == resp.base_model
            assert _module_dims(model_dir) == {
                m.module: (m.in_features, m.out_features) for m in got.base_model.modules
            }
        wider = tiny_model_factory("llama", hidden_size=96, intermediate_size=160)
        with pytest.raises(grpc.RpcError) as info:  # same id, other dims
            await client.registry.RegisterBaseModel(
                R.RegisterBaseModelRequest(
                    base_model_id="tiny/mistral", config_json=(wider / "config.json").read_text()
                )
            )
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        for req, code in [
            (R.GetBaseModelRequest(base_model_id="nope"), grpc.StatusCode.NOT_FOUND),
            (R.GetBaseModelRequest(base_model_id="../x"), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            assert await _code(client.registry.GetBaseModel(req)) == code
        with pytest.raises(grpc.RpcError) as info:
            await client.registry.RegisterBaseModel(
                R.RegisterBaseModelRequest(base_model_id="gpt", config_json='{"model_type":"gpt2"}')
            )
        assert "not supported" in parse_rpc_error(info.value).message


def _module_dims(model_dir) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection of the real transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dims = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short.endswith("_proj"):
            dims[short] = (module.in_features, module.out_features)
    return dims
