"""Retrieval quality of the real service path on LoraRetriever's 48-task pool.

Builds a tiny base model and one tiny PEFT adapter per task (loraserve.devmodels), pushes each
through the registry (in-process server on port 0, its Celery worker as threads, embedded
broker) with the task's 20 sample inputs, and queries the retriever's Retrieve RPC with the
480 mixed-task dev queries. Then runs TrainRetriever (JobService, queue ``train``) and measures
again on the collection it switched in. Prints one JSON line per case:

    top-1/3/5/8 accuracy per scoring mode (is the gold adapter among the k retrieved)
    mixture weighting: mean weight a MIXTURE (k=3) puts on the gold adapter, softmax vs 1/k
    out of distribution: the query's own adapter removed (allow-list of the other 47):
        share of the top-3 from the query's domain, and how often the top-1 is
    latency: Retrieve of one unseen prompt (p50/p99), batches of 32 unseen prompts (prompts/s)

Usage: python bench/retrieval_quality.py [--skip-train] [--epochs 1]
Training uses only the pool's samples; the dev queries are only ever evaluated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402

from loraserve import vectors as V  # noqa: E402
from loraserve.api.v1 import (  # noqa: E402
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    retriever_pb2,
    retriever_pb2_grpc,
)
from loraserve.devmodels import build_tiny_model, write_lora_adapter  # noqa: E402
from loraserve.settings import CommonSettings  # noqa: E402
from loraserve.upload import iter_push_requests  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "loraretriever"
BASE = "tiny-llama"
DEVICE = f"CPU, {os.cpu_count()} cores"
MODES = {
    "CENTROID": retriever_pb2.SCORING_MODE_CENTROID,
    "NEAREST_SAMPLE": retriever_pb2.SCORING_MODE_NEAREST_SAMPLE,
    "COMBINED": retriever_pb2.SCORING_MODE_COMBINED,
}
S = common_pb2.CompositionStrategy
BATCH = 32


def emit(**row: Any) -> None:
    print(json.dumps({"bench": "retrieval_quality", "device": DEVICE, **row}), flush=True)


class Bench:
    def __init__(self, retriever, registry, jobs, pool, queries, unseen):
        self.retriever = retriever
        self.registry = registry
        self.jobs = jobs
        self.pool: list[dict] = pool
        self.queries: list[dict] = queries
        self.unseen: list[str] = unseen
        self.tasks = [e["model_name"] for e in pool]
        self.domain = {q["task"]: q["domain"] for q in queries}

    async def retrieve(self, prompts: list[str], **kw) -> retriever_pb2.RetrieveResponse:
        return await self.retriever.Retrieve(
            retriever_pb2.RetrieveRequest(prompts=prompts, base_model=BASE, **kw)
        )

    async def accuracy(self, model: str) -> None:
        for name, mode in MODES.items():
            ranked: list[list[str]] = []
            for i in range(0, len(self.queries), BATCH):
                part = [q["inputs"] for q in self.queries[i : i + BATCH]]
                resp = await self.retrieve(
                    part,
                    top_k=8,
                    scoring=mode,
                    strategy=S.COMPOSITION_STRATEGY_SELECTION,
                    min_score=-1.0,
                )
                ranked += [[c.adapter_id for c in p.candidates] for p in resp.plans]
            gold = [q["task"] for q in self.queries]
            row = {
                f"top{k}": _pct(
                    sum(g in r[:k] for g, r in zip(gold, ranked, strict=True)), len(gold)
                )
                for k in (1, 3, 5, 8)
            }
            emit(case="accuracy", model=model, scoring=name, queries=len(gold), **row)
            await self.weighting(model, name, mode)

    async def weighting(self, model: str, name: str, mode: int) -> None:
        """Mean weight on the gold adapter of MIXTURE(k=3) plans, softmax vs uniform."""
        for wname, w in (
            ("SOFTMAX", retriever_pb2.MIXTURE_WEIGHTING_SOFTMAX),
            ("UNIFORM", retriever_pb2.MIXTURE_WEIGHTING_UNIFORM),
        ):
            total = 0.0
            for i in range(0, len(self.queries), BATCH):
                part = self.queries[i : i + BATCH]
                resp = await self.retrieve(
                    [q["inputs"] for q in part],
                    top_k=3,
                    scoring=mode,
                    weighting=w,
                    strategy=S.COMPOSITION_STRATEGY_MIXTURE,
                    min_score=-1.0,
                )
                for q, p in zip(part, resp.plans, strict=True):
                    total += sum(a.weight for a in p.plan.adapters if a.adapter_id == q["task"])
            emit(
                case="mixture_weighting",
                model=model,
                scoring=name,
                weighting=wname,
                k=3,
                gold_weight=round(total / len(self.queries), 4),
            )

    async def out_of_distribution(self, model: str) -> None:
        for name, mode in MODES.items():
            share, top1, n = 0.0, 0, 0
            for task in self.tasks:
                part = [q for q in self.queries if q["task"] == task]
                others = [t for t in self.tasks if t != task]
                resp = await self.retrieve(
                    [q["inputs"] for q in part],
                    top_k=3,
                    scoring=mode,
                    min_score=-1.0,
                    strategy=S.COMPOSITION_STRATEGY_SELECTION,
                    filter=retriever_pb2.RetrievalFilter(adapter_ids=others),
                )
                for q, p in zip(part, resp.plans, strict=True):
                    doms = [self.domain[c.adapter_id] for c in p.candidates]
                    share += sum(d == q["domain"] for d in doms) / len(doms)
                    top1 += doms[0] == q["domain"]
                    n += 1
            emit(
                case="out_of_distribution",
                model=model,
                scoring=name,
                queries=n,
                same_domain_top3_share=_pct(share, n),
                same_domain_top1=_pct(top1, n),
            )

    async def latency(self, model: str, singles: int = 200, batches: int = 5) -> None:
        for j, name in enumerate(("CENTROID", "COMBINED")):
            mode = MODES[name]
            # distinct texts per pass: the prompt-embedding cache must not answer
            fresh = [f"({model[:6]}/{j}) {t}" for t in self.unseen]
            prompts = fresh[:singles]
            times = []
            for p in prompts:
                start = time.perf_counter()
                await self.retrieve([p], top_k=3, scoring=mode)
                times.append((time.perf_counter() - start) * 1e3)
            cached = []
            for p in prompts[:50]:  # the prompt cache now holds these embeddings
                start = time.perf_counter()
                await self.retrieve([p], top_k=3, scoring=mode)
                cached.append((time.perf_counter() - start) * 1e3)
            rest = fresh[singles : singles + batches * BATCH]
            start = time.perf_counter()
            for i in range(0, len(rest), BATCH):
                await self.retrieve(rest[i : i + BATCH], top_k=3, scoring=mode)
            elapsed = time.perf_counter() - start
            emit(
                case="latency",
                model=model,
                scoring=name,
                prompts=len(times),
                p50_ms=round(statistics.median(times), 2),
                p99_ms=round(_p99(times), 2),
                cached_p50_ms=round(statistics.median(cached), 2),
                batch=BATCH,
                batch_prompts_per_s=round(len(rest) / elapsed, 1),
            )

    async def train(self, epochs: int) -> str:
        start = time.perf_counter()
        job = (
            await self.jobs.TrainRetriever(
                jobs_pb2.TrainRetrieverRequest(base_model=BASE, epochs=epochs)
            )
        ).job
        last = job
        async for update in self.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id)):
            last = update.job
        emit(
            case="train_retriever",
            state=jobs_pb2.JobState.Name(last.state),
            message=last.message,
            result=last.result,
            seconds=round(time.perf_counter() - start, 1),
            metrics={k: round(v, 4) for k, v in sorted(last.metrics.items())},
        )
        if last.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            raise SystemExit(f"TrainRetriever failed: {last.message}")
        return last.result


def _pct(x: float, n: int) -> float:
    return round(100.0 * x / n, 1)


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


async def ingest(bench: Bench, adapter_root: Path, model_dir: Path) -> None:
    config = (model_dir / "config.json").read_text()
    await bench.registry.RegisterBaseModel(
        registry_pb2.RegisterBaseModelRequest(base_model_id=BASE, config_json=config)
    )
    start = time.perf_counter()
    pushed = []
    for i, entry in enumerate(bench.pool):
        task = entry["model_name"]
        directory = write_lora_adapter(
            adapter_root / task,
            model_dir,
            rank=2,
            alpha=4.0,
            target_modules=["q_proj", "v_proj"],
            seed=i,
            base_model_id=BASE,
        )
        header = registry_pb2.PushAdapterHeader(
            adapter_id=task,
            base_model=BASE,
            domain=bench.domain[task].replace(" ", "_"),
            tags=[bench.domain[task].replace(" ", "_")],
            sample_inputs=[s["inputs"] for s in entry["sample"]],
        )
        resp = await bench.registry.PushAdapter(iter_push_requests(directory, header))
        pushed.append((task, resp.adapter.version))
    for task, version in pushed:
        while True:
            got = await bench.registry.GetAdapter(
                registry_pb2.GetAdapterRequest(adapter_id=task, version=version)
            )
            if got.adapter.status == common_pb2.ADAPTER_STATUS_READY:
                break
            if got.adapter.status == common_pb2.ADAPTER_STATUS_FAILED:
                raise SystemExit(f"{task}: {got.adapter.failure_reason}")
            await asyncio.sleep(0.1)
    emit(case="ingest", adapters=len(pushed), seconds=round(time.perf_counter() - start, 1))


async def main(args: argparse.Namespace) -> None:
    from registry_svc.server import build_server as build_registry
    from registry_svc.settings import RegistrySettings
    from registry_svc.worker import make_celery, start_worker_thread
    from retriever_svc.server import build_server as build_retriever
    from retriever_svc.settings import RetrieverSettings

    data = Path(args.data)
    pool = json.loads((data / "pool_48.json").read_text())
    queries = json.loads((data / "dev_queries.json").read_text())
    names48 = {e["model_name"] for e in pool}
    extra = json.loads((data / "pool_66.json").read_text())
    unseen = [s["inputs"] for e in extra if e["model_name"] not in names48 for s in e["sample"]]
    tmp = Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    common = CommonSettings(data_dir=tmp / "data", executor_addresses=[])
    reg_settings = RegistrySettings(port=0, common=common)
    app = make_celery(common, settings=reg_settings)
    registry = build_registry(reg_settings, celery=app)
    await registry.start()
    worker = await asyncio.to_thread(start_worker_thread, app, ("ingest", "train"), 1)
    ret_common = common.model_copy(update={"registry_address": registry.address})
    retriever = build_retriever(RetrieverSettings(port=0, common=ret_common))
    await retriever.start()
    reg_ch = grpc.aio.insecure_channel(registry.address)
    ret_ch = grpc.aio.insecure_channel(retriever.address)
    try:
        bench = Bench(
            retriever_pb2_grpc.RetrieverServiceStub(ret_ch),
            registry_pb2_grpc.RegistryServiceStub(reg_ch),
            jobs_pb2_grpc.JobServiceStub(reg_ch),
            pool,
            queries,
            unseen,
        )
        emit(
            case="setup",
            python=platform.python_version(),
            date=time.strftime("%Y-%m-%d"),
            pool=len(pool),
            queries=len(queries),
        )
        model_dir = build_tiny_model(tmp / "tiny-llama")
        await ingest(bench, tmp / "adapters", model_dir)
        model = "all-MiniLM-L6-v2"
        await bench.accuracy(model)
        await bench.out_of_distribution(model)
        await bench.latency(model)
        if not args.skip_train:
            collection = await bench.train(args.epochs)
            model = f"all-MiniLM-L6-v2 + TrainRetriever ({collection})"
            await bench.accuracy(model)
            await bench.out_of_distribution(model)
            await bench.latency(model)
    finally:
        await reg_ch.close()
        await ret_ch.close()
        await retriever.stop(grace=0.5)
        await asyncio.to_thread(worker.stop, 600.0)
        await registry.stop(grace=0.5)
        V.close_qdrant(common)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--epochs", type=int, default=0, help="0 = the job's default")
    asyncio.run(main(parser.parse_args()))
