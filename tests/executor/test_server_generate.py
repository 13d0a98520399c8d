"""ExecutorService end to end in-process: real server on port 0, real stubs, real engine (CPU)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from executor_fixtures import (
    DEVICE,
    executor_settings,
    plan,
    running_executor,
    stream_request,
    wait_idle,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.api.v1 import common_pb2, executor_pb2

S = common_pb2.CompositionStrategy


@pytest.fixture
def adapter_dir(adapter_factory, tmp_path):
    for i in range(6):
        adapter_factory(f"task-{i}", rank=4, seed=i + 1)
    return tmp_path / "adapters"


@pytest.fixture
def settings(tiny_model_dir, adapter_dir, tmp_path):
    return executor_settings(tiny_model_dir, tmp_path / "data", adapter_dir=str(adapter_dir))


async def collect(call) -> list[executor_pb2.GenerateStreamResponse]:
    return [msg async for msg in call]


async def test_generate_stream_base_and_adapters(settings):
    async with running_executor(settings) as (_, stub):
        for adapters in [(), (("task-0", 1.0),), (("task-1", 0.5), ("task-2", 0.5))]:
            msgs = await collect(stub.GenerateStream(stream_request(adapters=adapters)))
            assert msgs[0].time_to_first_token_ms > 0
            last = msgs[-1]
            assert last.finish_reason in (
                executor_pb2.FINISH_REASON_LENGTH,
                executor_pb2.FINISH_REASON_EOS,
            )
            tokens = [t for m in msgs for t in m.token_ids]
            assert last.usage.completion_tokens == len(tokens) <= 8
            assert last.usage.prompt_tokens > 0
            assert last.usage.total_tokens == last.usage.prompt_tokens + len(tokens)
            assert all(m.finish_reason == 0 for m in msgs[:-1])
        stats = await wait_idle(stub)
        assert stats.requests_completed == 3
        resident = {a.adapter_id for a in stats.resident_adapters}
        assert resident == {"task-0", "task-1", "task-2"}


async def test_generate_unary_matches_stream_greedy(settings):
    async with running_executor(settings) as (_, stub):
        req = stream_request(adapters=(("task-3", 1.0),), max_tokens=12)
        msgs = await collect(stub.GenerateStream(req))
        unary = await stub.Generate(
            executor_pb2.GenerateRequest(prompt=req.prompt, plan=req.plan, sampling=req.sampling)
        )
        assert list(unary.token_ids) == [t for m in msgs for t in m.token_ids]
        assert unary.text == "".join(m.text for m in msgs)
        assert unary.finish_reason == msgs[-1].finish_reason
        assert unary.total_time_ms >= unary.time_to_first_token_ms > 0
        assert unary.request_id  # made up by the server when empty


async def test_adapter_changes_output_and_fusion_equals_mixture(settings):
    """Fusion concatenates ranks, so it is the same function as the mixture (greedy tokens)."""
    async with running_executor(settings) as (_, stub):

        async def tokens(p):
            r = await stub.Generate(
                executor_pb2.GenerateRequest(
                    prompt="Summarise the article",
                    plan=p,
                    sampling=common_pb2.SamplingParams(max_tokens=16),
                )
            )
            return list(r.token_ids)

        pair = (("task-0", 0.3), ("task-1", 0.7))
        mixture = await tokens(plan(*pair, strategy=S.COMPOSITION_STRATEGY_MIXTURE))
        fusion = await tokens(plan(*pair, strategy=S.COMPOSITION_STRATEGY_FUSION))
        assert fusion == mixture
        listed = await stub.ListResidentAdapters(executor_pb2.ListResidentAdaptersRequest())
        assert any(a.adapter_id.startswith("fusion-") for a in listed.adapters)


async def test_health_not_serving_until_warm_then_serving(settings):
    async with (
        running_executor(settings, wait=False) as (server, _),
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        name = "loraserve.api.v1.ExecutorService"
        first = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.wait_ready(60)
        for _ in range(50):  # set_serving follows readiness on the same loop
            now = await health.Check(health_pb2.HealthCheckRequest(service=name))
            if now.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.02)
        assert now.status == health_pb2.HealthCheckResponse.SERVING


async def test_request_during_warmup_waits_instead_of_failing(settings):
    async with running_executor(settings, wait=False) as (_, stub):
        msgs = await collect(stub.GenerateStream(stream_request(), timeout=60))
        assert msgs[-1].finish_reason != 0


async def test_load_list_unload_adapters(settings):
    async with running_executor(settings) as (_, stub):
        ref = common_pb2.AdapterRef(adapter_id="task-4")
        loaded = await stub.LoadAdapter(executor_pb2.LoadAdapterRequest(adapter=ref, pin=True))
        a = loaded.adapter
        assert (a.adapter_id, a.version, a.pinned) == ("task-4", 1, True)
        assert a.location == executor_pb2.ADAPTER_LOCATION_GPU and a.slot >= 0 and a.size_bytes
        listed = await stub.ListResidentAdapters(executor_pb2.ListResidentAdaptersRequest())
        assert listed.slots_total == 4 and listed.slots_free == 3
        await stub.UnloadAdapter(executor_pb2.UnloadAdapterRequest(adapter=ref))
        listed = await stub.ListResidentAdapters(executor_pb2.ListResidentAdaptersRequest())
        assert listed.slots_free == 4
        assert all(a.adapter_id != "task-4" for a in listed.adapters)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UnloadAdapter(executor_pb2.UnloadAdapterRequest(adapter=ref))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Evicted from the GPU by pressure, an adapter stays in host memory (location HOST).
        for i in range(5):
            await collect(stub.GenerateStream(stream_request(adapters=((f"task-{i}", 1.0),))))
        listed = await stub.ListResidentAdapters(executor_pb2.ListResidentAdaptersRequest())
        where = {a.adapter_id: a.location for a in listed.adapters}
        assert where["task-0"] == executor_pb2.ADAPTER_LOCATION_HOST
        assert sum(v == executor_pb2.ADAPTER_LOCATION_GPU for v in where.values()) == 4


async def test_stats_report_slots_memory_and_kv(settings):
    async with running_executor(settings) as (_, stub):
        stats = await stub.GetStats(executor_pb2.GetStatsRequest())
        assert stats.device == DEVICE and stats.replica_id and stats.base_model
        assert stats.adapter_slots_total == 4 == stats.adapter_slots_free
        assert stats.adapter_memory_bytes_total == stats.adapter_memory_bytes_free > 0
        assert stats.kv_blocks_total == stats.kv_blocks_free > 0


async def test_slot_count_from_adapter_memory_budget(tiny_model_dir, tmp_path):
    # Tiny Llama, max_lora_rank 16, fp32: 131072 bytes per slot (2 layers x 7 projections).
    settings = executor_settings(
        tiny_model_dir, tmp_path / "data", num_lora_slots=0, adapter_memory_bytes=3 * 131072 + 5
    )
    if DEVICE != "cpu":
        pytest.skip("bytes per slot above are for fp32")
    async with running_executor(settings) as (_, stub):
        stats = await stub.GetStats(executor_pb2.GetStatsRequest())
        assert stats.adapter_slots_total == 3
        assert stats.adapter_memory_bytes_total == 3 * 131072


async def test_failed_start_stays_not_serving_and_answers_unavailable(tmp_path):
    settings = executor_settings(tmp_path / "no-such-model", tmp_path / "data")
    async with (
        running_executor(settings, wait=False) as (server, stub),
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(executor_pb2.GenerateRequest(prompt="hi"), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "start failed" in info.value.details()
        health = health_pb2_grpc.HealthStub(channel)
        got = await health.Check(health_pb2.HealthCheckRequest())
        assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_stats_name_the_merged_adapter(tiny_model_dir, adapter_dir, tmp_path):
    """Requests on one adapter alone: it is folded into the base weights (dLoRA's merged mode)
    after two steps, GetStats names it, and a later base request still gets base outputs."""
    settings = executor_settings(
        tiny_model_dir,
        tmp_path / "data",
        adapter_dir=str(adapter_dir),
        merge_adapters=True,
        merge_patience_steps=2,
    )
    async with running_executor(settings) as (_, stub):
        base = await stub.Generate(executor_pb2.GenerateRequest(prompt="hi", sampling=GREEDY_12))
        stats = await stub.GetStats(executor_pb2.GetStatsRequest())
        assert stats.merged_adapter_id == ""
        on_task = plan(("task-4", 1.0))
        await asyncio.gather(
            *(
                stub.Generate(
                    executor_pb2.GenerateRequest(prompt=p, plan=on_task, sampling=GREEDY_12)
                )
                for p in ("one", "two", "three")
            )
        )
        stats = await wait_idle(stub)
        assert stats.merged_adapter_id == "task-4"
        again = await stub.Generate(executor_pb2.GenerateRequest(prompt="hi", sampling=GREEDY_12))
        if DEVICE == "cpu":  # in bf16 the steps run merged (subtracting it) round once more
            assert list(again.token_ids) == list(base.token_ids)


GREEDY_12 = common_pb2.SamplingParams(max_tokens=12, min_tokens=12)
