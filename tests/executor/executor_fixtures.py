"""Shared helpers of the executor service tests: settings, an in-process server, stats polling."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from executor_svc.server import ExecutorServer, build_server
from executor_svc.settings import ExecutorSettings
from loraserve.api.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from loraserve.settings import CommonSettings

# The same tests run on a GPU through the device tool: LORASERVE_TEST_EXECUTOR_DEVICE=cuda.
DEVICE = os.environ.get("LORASERVE_TEST_EXECUTOR_DEVICE", "cpu")


def executor_settings(model_dir: Path, data_dir: Path, **kw) -> ExecutorSettings:
    kw.setdefault("use_registry", False)
    # Tests that compare greedy tokens across runs need outputs independent of the merge state:
    # in bf16 an adapter merged into the base weights rounds once more than the unmerged path
    # and flips near-ties of the random tiny model. In fp32 (CPU) merged mode stays on.
    kw.setdefault("merge_adapters", DEVICE == "cpu")
    return ExecutorSettings(
        port=0,
        model_dir=str(model_dir),
        device=DEVICE,
        num_lora_slots=kw.pop("num_lora_slots", 4),
        max_lora_rank=16,
        max_model_len=256,
        max_num_seqs=kw.pop("max_num_seqs", 32),
        common=CommonSettings(data_dir=data_dir),
        **kw,
    )


@asynccontextmanager
async def running_executor(
    settings: ExecutorSettings, *, wait: bool = True
) -> AsyncIterator[tuple[ExecutorServer, executor_pb2_grpc.ExecutorServiceStub]]:
    server = build_server(settings)
    await server.start()
    try:
        if wait:
            await server.wait_ready(60)
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, executor_pb2_grpc.ExecutorServiceStub(channel)
    finally:
        await server.stop(grace=0.5)


def plan(*adapters: tuple[str, float], strategy: int = 0, version: int = 0) -> common_pb2.LoraPlan:
    return common_pb2.LoraPlan(
        strategy=strategy,
        adapters=[
            common_pb2.WeightedAdapter(adapter_id=a, weight=w, version=version) for a, w in adapters
        ],
    )


def stream_request(prompt="Translate the sentence", adapters=(), max_tokens=8, **kw):
    return executor_pb2.GenerateStreamRequest(
        prompt=prompt,
        plan=kw.pop("plan", None) or plan(*adapters),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **kw),
    )


async def wait_idle(stub, timeout: float = 10.0) -> executor_pb2.GetStatsResponse:
    """Poll GetStats until nothing is queued, running, holding a slot, or holding KV blocks."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = await stub.GetStats(executor_pb2.GetStatsRequest())
        idle = (
            stats.queue_depth == 0
            and stats.running_requests == 0
            and stats.kv_blocks_free == stats.kv_blocks_total
            and all(a.active_requests == 0 for a in stats.resident_adapters)
        )
        if idle or asyncio.get_running_loop().time() > deadline:
            return stats
        await asyncio.sleep(0.02)
