"""The retriever's test stack: the real registry server, its Celery worker (threads, embedded
SQLite broker) and the retriever server, in-process on port 0, sharing one local Qdrant path.

    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        await st.push("sentiment", adapter_dir, SAMPLES["sentiment"], domain="sentiment")
        resp = await st.retriever.Retrieve(RetrieveRequest(prompts=[...], base_model=BASE))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from loraserve import vectors as V
from loraserve.api.v1 import (
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    retriever_pb2_grpc,
)
from loraserve.settings import CommonSettings
from loraserve.upload import iter_push_requests
from registry_svc.server import build_server as build_registry
from registry_svc.settings import RegistrySettings
from registry_svc.worker import make_celery, start_worker_thread
from retriever_svc.server import build_server as build_retriever
from retriever_svc.settings import RetrieverSettings

BASE = "tiny-llama"
READY = common_pb2.ADAPTER_STATUS_READY

# Five small tasks, six sample inputs each (the adapters are embedded from them).
SAMPLES: dict[str, list[str]] = {
    "sentiment": [
        "Is the sentiment of this review positive or negative? The film was wonderful.",
        "Review: terrible service and cold food. Sentiment?",
        "How would you rate the feeling of this tweet: I love sunny mornings!",
        "Classify the sentiment: the plot was dull and the acting was worse.",
        "Is this product review positive? It broke after two days.",
        "What is the sentiment of: an absolute delight from start to finish.",
    ],
    "translation": [
        "Translate to French: The cat sleeps on the sofa.",
        "Translate the following sentence into German: Where is the train station?",
        "How do you say 'good morning, my friend' in Spanish?",
        "Translate from English to Romanian: The weather is nice today.",
        "Render this in French: I would like a cup of coffee, please.",
        "Translate into Czech: The meeting starts at nine o'clock.",
    ],
    "arithmetic": [
        "Solve: 12 + 7 * 3 = ?",
        "What is 144 divided by 12?",
        "Compute the sum of 256 and 389.",
        "If x + 5 = 12, what is x?",
        "Calculate 15 percent of 80.",
        "What is the product of 23 and 17?",
    ],
    "sql": [
        "Write a SQL query that selects all users older than 30.",
        "SQL: count the orders per customer in the orders table.",
        "Give me the SQL to delete rows where status is 'inactive'.",
        "Write a query joining employees and departments on dept_id.",
        "Create an SQL statement that updates the price of product 42.",
        "SQL query for the ten most recent posts ordered by date.",
    ],
    "poetry": [
        "Write a short poem about the sea at night.",
        "Compose a haiku about autumn leaves.",
        "Write a sonnet about lost love.",
        "A limerick about a cat who could fly, please.",
        "Write four rhyming lines about the morning sun.",
        "Compose a free-verse poem about city rain.",
    ],
}
QUERIES = {
    "sentiment": "Was this review positive or negative: the hotel room was filthy.",
    "translation": "Translate to German: I am reading a book.",
    "arithmetic": "What is 45 times 3?",
    "sql": "Write SQL that lists customers from Berlin.",
    "poetry": "Write a poem about mountains in winter.",
}


@dataclass(slots=True)
class Stack:
    common: CommonSettings
    registry_address: str
    retriever_address: str
    registry: registry_pb2_grpc.RegistryServiceStub
    jobs: jobs_pb2_grpc.JobServiceStub
    retriever: retriever_pb2_grpc.RetrieverServiceStub

    async def push(
        self,
        adapter_id: str,
        adapter_dir: Path,
        samples: Sequence[str],
        *,
        tags: Sequence[str] = (),
        domain: str = "",
        base_model: str = BASE,
        wait: bool = True,
    ) -> common_pb2.Adapter:
        header = registry_pb2.PushAdapterHeader(
            adapter_id=adapter_id,
            base_model=base_model,
            tags=list(tags),
            domain=domain,
            sample_inputs=list(samples),
        )
        resp = await self.registry.PushAdapter(iter_push_requests(adapter_dir, header))
        if not wait:
            return resp.adapter
        return await self.wait_ready(adapter_id, resp.adapter.version)

    async def wait_ready(self, adapter_id: str, version: int = 0, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            got = await self.registry.GetAdapter(
                registry_pb2.GetAdapterRequest(adapter_id=adapter_id, version=version)
            )
            status = got.adapter.status
            if status == READY:
                return got.adapter
            if status == common_pb2.ADAPTER_STATUS_FAILED:
                raise AssertionError(f"{adapter_id} FAILED: {got.adapter.failure_reason}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{adapter_id} not READY after {timeout}s (status {status})")
            await asyncio.sleep(0.05)

    async def wait_job(self, job_id: str, timeout: float = 300.0) -> tuple[jobs_pb2.Job, list]:
        """Follow WatchJob to the end; returns the last job state and every update seen."""
        seen: list[jobs_pb2.Job] = []
        call = self.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=timeout)
        async for update in call:
            seen.append(update.job)
        return seen[-1], seen


@asynccontextmanager
async def retriever_stack(
    tmp_path: Path, tiny_model_dir: Path, **retriever_kw
) -> AsyncIterator[Stack]:
    data_dir = tmp_path / "data"
    common = CommonSettings(data_dir=data_dir, executor_addresses=["127.0.0.1:1"])
    reg_settings = RegistrySettings(port=0, common=common)
    app = make_celery(common, settings=reg_settings)
    registry = build_registry(reg_settings, celery=app)
    await registry.start()
    worker = None
    retriever = None
    channels: list[grpc.aio.Channel] = []
    try:
        worker = await asyncio.to_thread(start_worker_thread, app, ("ingest", "train"), 1)
        ret_common = common.model_copy(update={"registry_address": registry.address})
        retriever = build_retriever(RetrieverSettings(port=0, common=ret_common, **retriever_kw))
        await retriever.start()
        reg_ch = grpc.aio.insecure_channel(registry.address)
        ret_ch = grpc.aio.insecure_channel(retriever.address)
        channels += [reg_ch, ret_ch]
        stack = Stack(
            common=ret_common,
            registry_address=registry.address,
            retriever_address=retriever.address,
            registry=registry_pb2_grpc.RegistryServiceStub(reg_ch),
            jobs=jobs_pb2_grpc.JobServiceStub(reg_ch),
            retriever=retriever_pb2_grpc.RetrieverServiceStub(ret_ch),
        )
        config = (tiny_model_dir / "config.json").read_text()
        await stack.registry.RegisterBaseModel(
            registry_pb2.RegisterBaseModelRequest(base_model_id=BASE, config_json=config)
        )
        yield stack
    finally:
        for ch in channels:
            await ch.close()
        if retriever is not None:
            await retriever.stop(grace=0.5)
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await registry.stop(grace=0.5)
        V.close_qdrant(common)
