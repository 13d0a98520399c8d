"""Where a LoRA decode step's time goes, on a Llama-2-7B-shaped model (random bf16 weights).

Prints JSON lines, never asserts on time:
- ``graph_replay``: GPU time of one captured decode step (CUDA events around ``replay()``,
  median of 30) for no adapter, one adapter, 8 distinct; with the step's tile bucket and with
  the grid padded to the batch;
- ``host_meta``: host time of building and staging a step's LoRA metadata;
- ``projection``: each projection family of a layer at T tokens (qkv 3 slices, o, gate/up 2
  slices, down), CUDA graphs: the base GEMM alone and the marginal cost of add_lora on it.

Compare ``graph_replay`` with the engine benchmark's decode tokens/s to see the host's share
of a step.

    python bench/engine_step_profile.py [--batches 32 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import llama7b_config, random_adapter  # noqa: E402
from executor_svc.engine import Engine  # noqa: E402
from kernels import build_lora_meta  # noqa: E402
from kernels._bench import graph_ms  # noqa: E402


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def replay_ms(graph, n: int = 30) -> float:
    times = []
    for _ in range(n + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times[3:])


def plans_for(case: str, b: int) -> tuple[np.ndarray, np.ndarray]:
    d = {"one_adapter": 1, "8_distinct": 8}[case]
    slots = (np.arange(b) % d).astype(np.int32)[:, None]
    return slots, np.ones((b, 1), np.float32)


def profile_graphs(engine: Engine, batches: list[int]) -> None:
    runner = engine.runner
    for b in batches:
        emit(
            bench="graph_replay",
            batch=b,
            case="no_adapter",
            ms=round(replay_ms(runner.graphs[(b, 0, 0)].graph), 3),
        )
        for case in ("one_adapter", "8_distinct"):
            slots, weights = plans_for(case, b)
            for pads in (runner.tile_pads[b], [b]):
                host = build_lora_meta(
                    torch.from_numpy(slots),
                    torch.from_numpy(weights),
                    engine.model.num_slots,
                    torch.device("cpu"),
                    block_m=runner.graphs[(b, 1, b)].meta.block_m,
                    pad_tiles_to=pads,
                    mode="plan",
                )
                g = runner.graphs[(b, 1, host.grid_tiles)]
                runner._stager.copy(g.meta, host)
                emit(
                    bench="graph_replay",
                    batch=b,
                    case=case,
                    tile_pad=host.grid_tiles,
                    tiles=host.num_tiles,
                    ms=round(replay_ms(g.graph), 3),
                )


def profile_host(engine: Engine, batches: list[int]) -> None:
    runner = engine.runner
    for b in batches:
        slots, weights = plans_for("8_distinct", b)
        g = runner.graphs[(b, 1, runner.tile_pads[b][-1])]
        t = time.perf_counter()
        for _ in range(200):
            host = build_lora_meta(
                torch.from_numpy(slots),
                torch.from_numpy(weights),
                engine.model.num_slots,
                torch.device("cpu"),
                block_m=g.meta.block_m,
                pad_tiles_to=[b],
                mode="plan",
            )
            runner._stager.copy(g.meta, host)
        torch.cuda.synchronize()
        emit(bench="host_meta", batch=b, us=round((time.perf_counter() - t) / 200 * 1e6, 1))


def profile_projections(engine: Engine, batches: list[int]) -> None:
    layer = engine.model.layers[0]
    for b in batches:
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            m = getattr(layer, name)
            x = torch.randn(b, m.in_features, device="cuda", dtype=torch.bfloat16)
            for case in ("one_adapter", "8_distinct"):
                slots, weights = plans_for(case, b)
                meta = build_lora_meta(
                    torch.from_numpy(slots),
                    torch.from_numpy(weights),
                    engine.model.num_slots,
                    torch.device("cuda"),
                    mode="plan",
                )
                base = graph_ms(lambda m=m, x=x: m(x, None))
                with_lora = graph_ms(lambda m=m, x=x, meta=meta: m(x, meta))
                emit(
                    bench="projection",
                    batch=b,
                    op=name,
                    case=case,
                    base_us=round(base * 1e3, 1),
                    lora_marginal_us=round((with_lora - base) * 1e3, 1),
                )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    args = ap.parse_args()
    engine = Engine(
        None,
        hf_config=llama7b_config(),
        device="cuda",
        dtype=torch.bfloat16,
        num_lora_slots=8,
        max_lora_rank=16,
        max_num_seqs=max(args.batches),
        max_model_len=512,
        kv_memory_bytes=2 << 30,
        cuda_graph_batch_sizes=args.batches,
    )
    t = time.perf_counter()
    await engine.start()
    emit(
        bench="engine_start",
        seconds=round(time.perf_counter() - t, 1),
        gpu=torch.cuda.get_device_name(),
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    for slot in range(8):
        engine.model.set_lora(slot, random_adapter(engine.model, gen))
    profile_graphs(engine, args.batches)
    profile_host(engine, args.batches)
    profile_projections(engine, args.batches)
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
