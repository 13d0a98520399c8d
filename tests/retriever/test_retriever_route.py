"""Route against real in-process executors (tiny model, CPU): residency, load, failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from executor_svc.server import build_server as build_executor
from executor_svc.settings import ExecutorSettings
from loraserve.api.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from loraserve.settings import CommonSettings
from retriever_svc.server import build_server as build_retriever
from retriever_svc.settings import RetrieverSettings

DEAD = "127.0.0.1:1"


def executor(model_dir: Path, adapter_root: Path, data_dir: Path, name: str, **kw):
    return build_executor(
        ExecutorSettings(
            port=0,
            replica_id=name,
            model_dir=str(model_dir),
            device="cpu",
            num_lora_slots=2,
            max_lora_rank=8,
            max_model_len=128,
            max_num_seqs=4,
            adapter_dir=str(adapter_root),
            use_registry=False,
            common=CommonSettings(data_dir=data_dir),
            **kw,
        )
    )


async def start_router(data_dir: Path, addresses: list[str], servers: list, channels: list):
    """A retriever routing over ``addresses`` (stats cached 50 ms), started and recorded in
    ``servers`` and ``channels`` for the caller's cleanup; returns its stub."""
    common = CommonSettings(data_dir=data_dir, executor_addresses=addresses)
    retriever = build_retriever(RetrieverSettings(port=0, common=common, stats_ttl_s=0.05))
    await retriever.start()
    servers.append(retriever)
    ch = grpc.aio.insecure_channel(retriever.address)
    channels.append(ch)
    return retriever_pb2_grpc.RetrieverServiceStub(ch)


def plan(*ids: str) -> common_pb2.LoraPlan:
    return common_pb2.LoraPlan(
        strategy=common_pb2.COMPOSITION_STRATEGY_MIXTURE,
        adapters=[common_pb2.WeightedAdapter(adapter_id=i, weight=1.0 / len(ids)) for i in ids],
    )


async def test_route_by_residency_and_availability(tmp_path, tiny_model_dir, tiny_adapters):
    adapter_root = tiny_adapters[0].parent  # <root>/a0 ... <root>/a7
    ex_a = executor(tiny_model_dir, adapter_root, tmp_path / "a", "replica-a")
    ex_b = executor(tiny_model_dir, adapter_root, tmp_path / "b", "replica-b")
    started = []
    channels: list[grpc.aio.Channel] = []
    try:
        for ex in (ex_a, ex_b):
            await ex.start()
            started.append(ex)
        await asyncio.gather(ex_a.wait_ready(60), ex_b.wait_ready(60))
        stub = await start_router(
            tmp_path / "r", [ex_a.address, ex_b.address, DEAD], started, channels
        )
        base = tiny_model_dir.name  # executors report their model directory's name

        async def route(*ids: str, base_model: str = base) -> retriever_pb2.RouteResponse:
            await asyncio.sleep(0.06)  # past the stats cache
            return await stub.Route(
                retriever_pb2.RouteRequest(plan=plan(*ids), base_model=base_model)
            )

        first = await route("a1")  # nothing resident, equal load: deterministic least loaded
        assert first.reason.startswith("least loaded") and first.replica_id in (
            "replica-a",
            "replica-b",
        )
        for ex, adapter in ((ex_b, "a1"), (ex_a, "a2")):
            async with grpc.aio.insecure_channel(ex.address) as ech:
                await executor_pb2_grpc.ExecutorServiceStub(ech).LoadAdapter(
                    executor_pb2.LoadAdapterRequest(
                        adapter=common_pb2.AdapterRef(adapter_id=adapter)
                    )
                )
        got = await route("a1")
        assert (got.replica_id, got.address) == ("replica-b", ex_b.address)
        assert got.reason.startswith("adapters resident (1/1)")
        got = await route("a2")
        assert got.replica_id == "replica-a"
        got = await route("a1", "a2")
        assert got.reason.startswith("adapters partly resident (1/2)")
        got = await route("a1", base_model="meta-llama/Llama-2-7b-hf")
        assert got.replica_id == "replica-b" and "no replica reports base model" in got.reason

        await ex_b.stop(grace=0.2)  # a replica going away: work goes to the others
        started.remove(ex_b)
        got = await route("a1")
        assert got.replica_id == "replica-a"
        await ex_a.stop(grace=0.2)
        started.remove(ex_a)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await route("a1")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ex_a.address in err.value.details() and DEAD in err.value.details()
    finally:
        for ch in channels:
            await ch.close()
        for server in reversed(started):
            await server.stop(grace=0.2)


async def test_route_prefers_the_replica_with_the_adapter_merged(
    tmp_path, tiny_model_dir, tiny_adapters
):
    """Both replicas hold a1; requests on a1 alone run on replica-a until it folds a1 into its
    base weights (dLoRA's merged mode): Route sends a1 there and a base request elsewhere."""
    adapter_root = tiny_adapters[0].parent
    kw = {"merge_patience_steps": 2}
    ex_a = executor(tiny_model_dir, adapter_root, tmp_path / "a", "replica-a", **kw)
    ex_b = executor(tiny_model_dir, adapter_root, tmp_path / "b", "replica-b", **kw)
    servers, channels = [], []
    try:
        for ex in (ex_a, ex_b):
            await ex.start()
            servers.append(ex)
            await ex.wait_ready(60)
            ch = grpc.aio.insecure_channel(ex.address)
            channels.append(ch)
            await executor_pb2_grpc.ExecutorServiceStub(ch).LoadAdapter(
                executor_pb2.LoadAdapterRequest(adapter=common_pb2.AdapterRef(adapter_id="a1"))
            )
        on_a = executor_pb2_grpc.ExecutorServiceStub(channels[0])
        sampling = common_pb2.SamplingParams(max_tokens=12, min_tokens=12)
        await on_a.Generate(
            executor_pb2.GenerateRequest(prompt="hello", plan=plan("a1"), sampling=sampling)
        )
        stats = await on_a.GetStats(executor_pb2.GetStatsRequest())
        assert stats.merged_adapter_id == "a1"
        stub = await start_router(tmp_path / "r", [ex_a.address, ex_b.address], servers, channels)
        base = tiny_model_dir.name
        got = await stub.Route(retriever_pb2.RouteRequest(plan=plan("a1"), base_model=base))
        assert got.replica_id == "replica-a" and got.reason.startswith("adapter merged")
        got = await stub.Route(retriever_pb2.RouteRequest(plan=plan(), base_model=base))
        assert got.replica_id == "replica-b" and got.reason.startswith("no other adapter merged")
    finally:
        for ch in channels:
            await ch.close()
        for server in reversed(servers):
            await server.stop(grace=0.2)
