"""Open-loop serving on the engine: requests arrive over time, as a service's traffic does.

Llama-2-7B-shaped model with random bf16 weights, rank-16 adapters on all 7 projections.
Requests arrive in a Poisson process (``--rate`` per second), each with a prompt of
``--prompt-min``..``--prompt-max`` random tokens, ``--new`` new tokens (EOS ignored) and one of
8 adapters (``--adapters 0``: none). So steps mix the running decodes with the prompts that
just arrived: mostly small steps, unlike engine_bench.py's closed batches. Reported per
variant (JSON lines; never asserts on time): generated tok/s over the run, time to first token
and inter-token latency (p50 / p90 / p99 / max, ms, from each request's stream), and the steps
by kind: eager (``eager_steps``, their mean ms in the runner), graph replays with prompt rows
(``prompt_graph_steps``) and pure decode replays.

Variants, interleaved in rounds (``--repeats``) on one engine:
    rows      steps with prompt rows replay the decode graphs when they fit (the default)
    eager     only pure decode steps replay graphs (``ModelRunner.prompt_rows = False``)

    python bench/engine_arrivals_bench.py [--rate 64] [--requests 384] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import StepTimer, llama7b_engine, start_with_adapters  # noqa: E402
from executor_svc.engine import Engine, EngineRequest, SamplingOptions  # noqa: E402


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1e3, 2) if v else 0.0


class ServingProbe(StepTimer):
    """Every step while installed (:class:`~bench.engine_bench.StepTimer`), plus the
    collector's pauses (Python's gc) and the Triton variants compiled meanwhile (none, if the
    engine's warm-up covered them), to place latency outliers. ``summary()``: steps by kind
    (count, mean ms in the runner), the five slowest (ms, ms until queued, kind, tokens,
    entries, merged slot before and after), gc pauses, compiles."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.gc_pauses: list[float] = []
        self.compiles: list[str] = []
        self._gc_start = 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_start)

    def _on_compile(self, **hook) -> bool:
        """Triton is about to compile (or load from its disk cache) a variant while serving:
        the engine's warm-up missed it. Returns False: compile as usual."""
        if not hook.get("is_manual_warmup"):
            self.compiles.append(str(hook.get("repr"))[:400])
        return False

    def __enter__(self):
        super().__enter__()
        gc.callbacks.append(self._on_gc)
        triton.knobs.runtime.jit_cache_hook = self._on_compile
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        gc.callbacks.remove(self._on_gc)
        triton.knobs.runtime.jit_cache_hook = None

    def summary(self) -> dict:
        out = {}
        for kind in ("eager", "prompt_graph", "decode_graph"):
            secs = [st.seconds for st in self.steps if st.kind == kind]
            out[f"{kind}_steps"] = len(secs)
            out[f"{kind}_mean_ms"] = round(sum(secs) / len(secs) * 1e3, 2) if secs else 0.0
        slowest = sorted(self.steps, key=lambda st: st.seconds, reverse=True)[:5]
        out["slowest_steps"] = [
            (
                round(st.seconds * 1e3, 1),
                None if st.queued is None else round(st.queued * 1e3, 1),
                st.kind,
                st.tokens,
                st.entries,
                *st.merged,
            )
            for st in slowest
        ]
        out["gc_pauses"] = len(self.gc_pauses)
        out["gc_max_ms"] = round(max(self.gc_pauses, default=0.0) * 1e3, 2)
        out["gc_total_ms"] = round(sum(self.gc_pauses) * 1e3, 1)
        out["compiled_while_serving"] = self.compiles
        return out


async def run(engine: Engine, args, seed: int) -> dict:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        n = rng.randint(args.prompt_min, args.prompt_max)
        prompt = [rng.randrange(3, 32000) for _ in range(n)]
        plan = [(i % args.adapters, 1.0)] if args.adapters else []
        arrivals.append((t, prompt, plan))
    ttft, itl, tokens = [], [], 0
    t0 = time.perf_counter()

    async def one(i: int, at: float, prompt: list[int], plan) -> None:
        nonlocal tokens
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        sent = last = time.perf_counter()
        r = EngineRequest(
            f"a{seed}-{i}",
            "",
            plan,
            SamplingOptions(max_tokens=args.new, ignore_eos=True),
            prompt_token_ids=prompt,
        )
        first = True
        async for ev in engine.generate(r):
            now = time.perf_counter()
            if first:
                ttft.append(now - sent)
                first = False
            else:
                itl.append(now - last)
            last = now
            tokens += len(ev.token_ids)

    with ServingProbe(engine) as kinds:
        await asyncio.gather(*(one(i, *a) for i, a in enumerate(arrivals)))
    wall = time.perf_counter() - t0
    return {
        "tok_s": round(tokens / wall, 1),
        "seconds": round(wall, 3),
        **{f"ttft_p{int(q * 100)}_ms": pct(ttft, q) for q in (0.5, 0.9, 0.99)},
        "ttft_max_ms": pct(ttft, 1.0),
        **{f"itl_p{int(q * 100)}_ms": pct(itl, q) for q in (0.5, 0.9, 0.99)},
        "itl_max_ms": pct(itl, 1.0),
        **kinds.summary(),
    }


# variant -> ModelRunner.prompt_rows
VARIANTS = {"rows": True, "eager": False}


async def main_async(args) -> None:
    engine = llama7b_engine(
        8,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.prompt_max + args.new + 16,
        max_num_batched_tokens=args.max_batched_tokens,
    )
    seconds = await start_with_adapters(engine, 8)
    emit(
        case="engine_start",
        seconds=round(seconds, 1),
        graph_sizes=engine.runner.graph_sizes,
        graphs=len(engine.runner.graphs),
    )
    runner = engine.runner
    default_reads = runner.rows_max_prompt_context
    # (name, prompt rows on, most context the prompt rows may read: decode_rows)
    variants = [
        (name if reads == default_reads else f"{name}@{reads}", prompt_rows, reads)
        for name, prompt_rows in VARIANTS.items()
        if name in args.variants
        for reads in (
            (args.rows_max_context or [default_reads]) if prompt_rows else [default_reads]
        )
    ]
    await run(engine, argparse.Namespace(**{**vars(args), "requests": 64}), seed=99)  # warm-up
    for rnd in range(args.repeats):
        for name, prompt_rows, reads in variants:
            runner.prompt_rows, runner.rows_max_prompt_context = prompt_rows, reads
            r = await run(engine, args, seed=rnd)  # every variant sees the same arrivals
            emit(
                case=name,
                rows_max_prompt_context=reads,
                round=rnd,
                rate=args.rate,
                requests=args.requests,
                prompt=[args.prompt_min, args.prompt_max],
                new_tokens=args.new,
                adapters=args.adapters,
                **r,
            )
    runner.prompt_rows, runner.rows_max_prompt_context = True, default_reads
    await engine.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=64.0, help="requests per second (Poisson)")
    p.add_argument("--requests", type=int, default=384)
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters; 0 = none")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--rows-max-context",
        type=int,
        nargs="+",
        help="rows: one variant per limit on the context a step's prompt rows may read "
        "(ModelRunner.rows_max_prompt_context; default: the engine's)",
    )
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="rows: small steps with prompt chunks replay the decode graphs; eager: they do not",
    )  # fmt: skip
    args = p.parse_args()
    emit(case="device", gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
