"""Serving-layer benchmark: the real executor gRPC server, in-process, under concurrent streams.

Prints one JSON line per case (and the device first); never asserts on time. Every case sends
``--requests`` concurrent GenerateStream calls (prompt ~20 tokens, ``--new`` tokens each,
EOS ignored via min_tokens) over ``--adapters`` rank-``--rank`` adapters on all 7 projections:

    base       no adapter
    resident   one adapter per request, every adapter in its own slot (preloaded)
    churn      one adapter per request, only --churn-slots slots: adapters swap in and out
    mixture2   two weighted adapters per request (MIXTURE), all resident
    fusion2    the same pairs as FUSION (rank 2r, one slot per pair)
    pool       --pool registered adapters (default 1,000), --pool-slots GPU slots (64), requests
               drawn Zipf(1) over the pool: the disk -> host cache -> slot path under churn

Each case runs its workload twice and times the second run. Reported: wall time, generated
tokens/s, time to first token p50/p99 (from the client), slot swap-ins during the timed run. Then adapter swap cost on this model: parse (safetensors -> host tensors) and
host -> slot copy (``set_lora``, pinned source on CUDA), medians of 20.

    python bench/executor_serving_bench.py [--model small|tiny] [--requests 256] [--new 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor_svc.adapters.refs import AdapterKey  # noqa: E402
from executor_svc.server import build_server  # noqa: E402
from executor_svc.settings import ExecutorSettings  # noqa: E402
from loraserve.api.v1 import common_pb2, executor_pb2, executor_pb2_grpc  # noqa: E402
from loraserve.devmodels import build_tiny_model, write_lora_adapter  # noqa: E402
from loraserve.settings import CommonSettings  # noqa: E402

MODELS = {
    "tiny": {},
    # ~90M parameters: big enough that a step is GPU work, small enough to build anywhere.
    "small": dict(
        hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=4
    ),
}
PROMPTS = ["Translate the sentence to French: the quick brown fox jumps over the lazy dog."]


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2) if s else 0.0


async def run_case(name, model_dir, adapter_dir, data_dir, args, *, slots, plans) -> None:
    settings = ExecutorSettings(
        port=0,
        model_dir=str(model_dir),
        device=args.device,
        num_lora_slots=slots,
        max_lora_rank=2 * args.rank,
        max_num_seqs=args.max_num_seqs,
        max_model_len=256,
        adapter_dir=str(adapter_dir),
        use_registry=False,
        slot_wait_s=300,
        common=CommonSettings(data_dir=data_dir),
    )
    server = build_server(settings)
    await server.start()
    await server.wait_ready(600)
    rt = server.runtime
    try:
        async with __import__("grpc").aio.insecure_channel(server.address) as channel:
            stub = executor_pb2_grpc.ExecutorServiceStub(channel)
            sampling = common_pb2.SamplingParams(max_tokens=args.new, min_tokens=args.new)

            async def one(i: int) -> tuple[float, int]:
                req = executor_pb2.GenerateStreamRequest(
                    prompt=PROMPTS[0], plan=plans(i), sampling=sampling
                )
                t0, ttft, n = time.perf_counter(), None, 0
                async for msg in stub.GenerateStream(req):
                    if ttft is None:
                        ttft = (time.perf_counter() - t0) * 1e3
                    n += len(msg.token_ids)
                return ttft or 0.0, n

            # Warm-up: the whole workload once. A smaller warm-up leaves Triton compiles of the
            # LoRA kernels for new batch shapes inside the timed run (seen: 9 s TTFT p50).
            await asyncio.gather(*(one(i) for i in range(args.requests)))
            loads0 = rt.slots.loads
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(i) for i in range(args.requests)))
            wall = time.perf_counter() - t0
            ttfts = [r[0] for r in results]
            tokens = sum(r[1] for r in results)
            emit(
                case=name,
                requests=args.requests,
                new_tokens=args.new,
                slots=slots,
                adapters=args.adapters,
                wall_s=round(wall, 3),
                tokens_per_s=round(tokens / wall, 1),
                ttft_p50_ms=pct(ttfts, 0.5),
                ttft_p99_ms=pct(ttfts, 0.99),
                swap_ins=rt.slots.loads - loads0,
                host_cached=len(rt.store.host_cache.entries()),
            )
            if name == "resident":
                await swap_cost(rt, adapter_dir, args)
    finally:
        await server.stop(grace=1)


def write_pool(template: Path, root: Path, n: int) -> None:
    """n adapters shaped like ``template`` with fresh random tensors (no PEFT: fast)."""
    from safetensors.torch import load_file, save_file

    config = (template / "adapter_config.json").read_text()
    shapes = {
        k: (t.shape, t.dtype) for k, t in load_file(template / "adapter_model.safetensors").items()
    }
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        out = root / f"p{i}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(config)
        tensors = {
            k: (torch.randn(shape, generator=g) * 0.02).to(dt) for k, (shape, dt) in shapes.items()
        }
        save_file(tensors, out / "adapter_model.safetensors")


def zipf_indices(n: int, count: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=g).tolist()


async def swap_cost(rt, adapter_dir: Path, args) -> None:
    """Parse time and host->slot copy time of one adapter, medians of 20."""
    from executor_svc.model.lora_loader import load_adapter

    path = adapter_dir / "a0"
    parse, copy = [], []
    dtype = rt.engine.model.dtype
    weights = rt.store.host_cache.get(AdapterKey("a0", 1))
    for _ in range(20):
        t0 = time.perf_counter()
        load_adapter(path, dtype=dtype)
        parse.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        rt.engine.model.set_lora(rt.engine.model.num_slots - 1, weights)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        copy.append((time.perf_counter() - t0) * 1e3)
    rt.engine.model.reset_lora(rt.engine.model.num_slots - 1)
    emit(
        case="swap_cost",
        rank=args.rank,
        adapter_bytes=sum(m.a.nbytes + m.b.nbytes for ms in weights.values() for m in ms.values()),
        parse_ms_p50=round(statistics.median(parse), 3),
        host_to_slot_ms_p50=round(statistics.median(copy), 3),
        pinned=bool(next(iter(weights[0].values())).a.is_pinned()),
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--churn-slots", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--pool", type=int, default=1000)
    parser.add_argument("--pool-slots", type=int, default=64)
    parser.add_argument(
        "--cases", nargs="*", default=["base", "resident", "churn", "mixture2", "fusion2"]
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    model_dir = build_tiny_model(root / "model", **MODELS[args.model])
    adapter_dir = root / "adapters"
    for i in range(args.adapters):
        write_lora_adapter(
            adapter_dir / f"a{i}",
            model_dir,
            rank=args.rank,
            alpha=2 * args.rank,
            seed=i,
            dtype=torch.bfloat16,  # as adapters are usually shipped; parsed into the model dtype
        )
    dev = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    emit(
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        torch=torch.__version__,
        model=args.model,
    )
    n = args.adapters
    mix = common_pb2.COMPOSITION_STRATEGY_MIXTURE
    fus = common_pb2.COMPOSITION_STRATEGY_FUSION

    def plan(*items, strategy=0):
        return common_pb2.LoraPlan(
            strategy=strategy,
            adapters=[common_pb2.WeightedAdapter(adapter_id=a, weight=w) for a, w in items],
        )

    cases = {
        "base": (1, lambda i: plan()),
        "resident": (n, lambda i: plan((f"a{i % n}", 1.0))),
        "churn": (args.churn_slots, lambda i: plan((f"a{i % n}", 1.0))),
        "mixture2": (n, lambda i: plan((f"a{i % n}", 0.6), (f"a{(i + 1) % n}", 0.4), strategy=mix)),
        "fusion2": (n, lambda i: plan((f"a{i % n}", 0.6), (f"a{(i + 1) % n}", 0.4), strategy=fus)),
    }
    if "pool" in args.cases:
        write_pool(adapter_dir / "a0", adapter_dir, args.pool)
        draw = zipf_indices(args.pool, args.requests)
        cases["pool"] = (args.pool_slots, lambda i: plan((f"p{draw[i]}", 1.0)))
        emit(case="pool_workload", pool=args.pool, distinct_in_workload=len(set(draw)))
    for name in args.cases:
        slots, plans = cases[name]
        await run_case(
            name, model_dir, adapter_dir, root / f"data-{name}", args, slots=slots, plans=plans
        )


if __name__ == "__main__":
    asyncio.run(main())
