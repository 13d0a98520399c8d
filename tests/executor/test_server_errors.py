"""Bad requests, missing adapters, full queues, cancellation and deadlines, through real stubs."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from executor_fixtures import executor_settings, plan, running_executor, stream_request, wait_idle

from loraserve.api.v1 import common_pb2, executor_pb2
from loraserve.errors import parse_rpc_error

S = common_pb2.CompositionStrategy
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def wa(adapter_id: str, weight: float = 1.0, version: int = 0) -> common_pb2.WeightedAdapter:
    return common_pb2.WeightedAdapter(adapter_id=adapter_id, weight=weight, version=version)


def req(prompt="Answer the question", adapters=(), strategy=0, request_id="", **sampling):
    sampling.setdefault("max_tokens", 4)
    return executor_pb2.GenerateStreamRequest(
        request_id=request_id,
        prompt=prompt,
        plan=common_pb2.LoraPlan(strategy=strategy, adapters=list(adapters)),
        sampling=common_pb2.SamplingParams(**sampling),
    )


# (case id, request, expected status, BadRequest field expected among the violations)
ERROR_CASES = [
    ("empty prompt", req(prompt=""), INVALID, "prompt"),
    ("prompt over max_model_len", req(prompt="0123456789 ! ? " * 300), INVALID, "prompt"),
    ("negative temperature", req(temperature=-0.5), INVALID, "sampling.temperature"),
    ("nan temperature", req(temperature=math.nan), INVALID, "sampling.temperature"),
    ("top_p above 1", req(top_p=1.5), INVALID, "sampling.top_p"),
    ("top_p below 0", req(top_p=-0.1), INVALID, "sampling.top_p"),
    ("max_tokens over cap", req(max_tokens=5000), INVALID, "sampling.max_tokens"),
    ("min_tokens over max_tokens", req(max_tokens=4, min_tokens=9), INVALID, "sampling.min_tokens"),
    ("too many stop strings", req(stop=["x"] * 9), INVALID, "sampling.stop"),
    ("stop string too long", req(stop=["y" * 200]), INVALID, "sampling.stop[0]"),
    ("empty stop string", req(stop=[""]), INVALID, "sampling.stop[0]"),
    ("request_id too long", req(request_id="r" * 200), INVALID, "request_id"),
    ("empty adapter id", req(adapters=[wa("")]), INVALID, "plan.adapters[0].adapter_id"),
    (
        "duplicate adapter",
        req(
            adapters=[wa("task-0", 0.5), wa("task-0", 0.5)], strategy=S.COMPOSITION_STRATEGY_MIXTURE
        ),
        INVALID,
        "plan.adapters[1].adapter_id",
    ),
    (
        "duplicate after resolving version 0",
        req(adapters=[wa("task-0", 0.5), wa("task-0", 0.5, version=1)]),
        INVALID,
        "plan.adapters[1].adapter_id",
    ),
    (
        "mixture of 5 (K > 4)",
        req(
            adapters=[wa(f"task-{i}", 0.2) for i in range(5)],
            strategy=S.COMPOSITION_STRATEGY_MIXTURE,
        ),
        INVALID,
        "plan.adapters",
    ),
    ("negative weight", req(adapters=[wa("task-0", -0.5)]), INVALID, "plan.adapters[0].weight"),
    ("infinite weight", req(adapters=[wa("task-0", math.inf)]), INVALID, "plan.adapters[0].weight"),
    (
        "selection of two",
        req(adapters=[wa("task-0"), wa("task-1")], strategy=S.COMPOSITION_STRATEGY_SELECTION),
        INVALID,
        "plan.adapters",
    ),
    (
        "fusion above max_lora_rank (5 x rank 4 > 16)",
        req(
            adapters=[wa(f"task-{i}", 0.2) for i in range(5)],
            strategy=S.COMPOSITION_STRATEGY_FUSION,
        ),
        INVALID,
        "plan.adapters",
    ),
    ("unknown adapter", req(adapters=[wa("no-such-adapter")]), grpc.StatusCode.NOT_FOUND, None),
    ("unknown version", req(adapters=[wa("task-0", version=7)]), grpc.StatusCode.NOT_FOUND, None),
    (
        "gate plans not served yet",
        req(adapters=[wa("task-0")], strategy=S.COMPOSITION_STRATEGY_GATE),
        grpc.StatusCode.UNIMPLEMENTED,
        None,
    ),
]


@pytest.fixture
def adapter_dir(adapter_factory, tmp_path):
    for i in range(6):
        adapter_factory(f"task-{i}", rank=4, seed=i + 1)
    return tmp_path / "adapters"


@pytest.fixture
def settings(tiny_model_dir, adapter_dir, tmp_path):
    return executor_settings(tiny_model_dir, tmp_path / "data", adapter_dir=str(adapter_dir))


async def test_error_cases(settings):
    """One server for the whole table; every case through both RPCs; nothing leaks."""
    async with running_executor(settings) as (_, stub):
        for name, request, code, field in ERROR_CASES:
            unary = executor_pb2.GenerateRequest(
                request_id=request.request_id,
                prompt=request.prompt,
                plan=request.plan,
                sampling=request.sampling,
            )
            for call in (stub.GenerateStream(request), stub.Generate(unary)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    if isinstance(call, grpc.aio.UnaryStreamCall):
                        _ = [m async for m in call]
                    else:
                        await call
                err = parse_rpc_error(info.value)
                assert err.code == code, f"{name}: {err.code} {err.message}"
                if field is not None:
                    fields = [v.field for v in err.violations]
                    assert field in fields, f"{name}: {fields}"
        stats = await wait_idle(stub)
        assert stats.queue_depth == stats.running_requests == 0
        assert all(a.active_requests == 0 for a in stats.resident_adapters)


async def test_cancel_mid_stream_frees_kv_and_slot_refs(settings):
    async with running_executor(settings) as (_, stub):
        call = stub.GenerateStream(
            stream_request(adapters=(("task-0", 1.0),), max_tokens=240, min_tokens=240)
        )
        seen = 0
        async for _ in call:
            seen += 1
            if seen == 3:
                busy = await stub.GetStats(executor_pb2.GetStatsRequest())
                assert busy.running_requests == 1
                assert busy.kv_blocks_free < busy.kv_blocks_total
                (task0,) = [a for a in busy.resident_adapters if a.adapter_id == "task-0"]
                assert task0.active_requests == 1
                call.cancel()
                break
        stats = await wait_idle(stub)
        assert stats.kv_blocks_free == stats.kv_blocks_total
        assert stats.running_requests == 0 and stats.queue_depth == 0
        (task0,) = [a for a in stats.resident_adapters if a.adapter_id == "task-0"]
        assert task0.active_requests == 0


async def test_deadline_mid_stream_frees_resources(settings):
    async with running_executor(settings) as (_, stub):
        request = stream_request(adapters=(("task-1", 1.0),), max_tokens=240, min_tokens=240)
        # The deadline falls about a third of the way into the 240 tokens on any device: 2.5x
        # a 32-token stream's time here (the adapter resident by then). A fixed 0.1 s outlasted
        # the whole stream on an H100. The fastest of three probes: one that stalls (a kernel
        # variant compiling on a cold GPU) would stretch the deadline past the whole stream.
        probe = stream_request(adapters=(("task-1", 1.0),), max_tokens=32, min_tokens=32)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            _ = [m async for m in stub.GenerateStream(probe)]
            times.append(time.perf_counter() - start)
        timeout = 2.5 * min(times)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [m async for m in stub.GenerateStream(request, timeout=timeout)]
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = await wait_idle(stub)
        assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running_requests == 0
        assert all(a.active_requests == 0 for a in stats.resident_adapters)


async def test_deadline_while_waiting_for_a_slot(tiny_model_dir, adapter_dir, tmp_path):
    settings = executor_settings(
        tiny_model_dir, tmp_path / "data", adapter_dir=str(adapter_dir), num_lora_slots=1
    )
    async with running_executor(settings) as (_, stub):
        pin = common_pb2.AdapterRef(adapter_id="task-0")
        await stub.LoadAdapter(executor_pb2.LoadAdapterRequest(adapter=pin, pin=True))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(
                executor_pb2.GenerateRequest(prompt="hi", plan=plan(("task-1", 1.0))), timeout=0.3
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = await wait_idle(stub)
        assert stats.queue_depth == 0


async def test_full_queue_and_busy_slots_answer_resource_exhausted_with_retry_info(
    tiny_model_dir, adapter_dir, tmp_path
):
    settings = executor_settings(
        tiny_model_dir,
        tmp_path / "data",
        adapter_dir=str(adapter_dir),
        num_lora_slots=1,
        max_queue=1,
        slot_wait_s=0.5,
    )
    async with running_executor(settings) as (_, stub):
        pin = common_pb2.AdapterRef(adapter_id="task-0")
        await stub.LoadAdapter(executor_pb2.LoadAdapterRequest(adapter=pin, pin=True))
        # Waits for the one slot (pinned): it sits in the queue, which is now full.
        waiting = asyncio.ensure_future(
            stub.Generate(executor_pb2.GenerateRequest(prompt="a", plan=plan(("task-1", 1.0))))
        )
        for _ in range(100):
            if (await stub.GetStats(executor_pb2.GetStatsRequest())).queue_depth == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(executor_pb2.GenerateRequest(prompt="b"))
        full = parse_rpc_error(info.value)
        assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert full.reason == "QUEUE_FULL" and full.retry_after_s and full.retry_after_s > 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await waiting
        busy = parse_rpc_error(info.value)
        assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert busy.reason == "ADAPTER_SLOTS_BUSY" and busy.retry_after_s
        # Once the queue drains, the base model (no slot needed) is served again.
        ok = await stub.Generate(executor_pb2.GenerateRequest(prompt="b"))
        assert ok.finish_reason != 0
        stats = await wait_idle(stub)
        assert stats.queue_depth == 0 and stats.running_requests == 0
