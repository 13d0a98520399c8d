"""Where a LoRA decode step's time goes, on a Llama-2-7B-shaped model (random bf16 weights).

Prints JSON lines, never asserts on time:
- ``graph_replay``: GPU time of one captured decode step (CUDA events around ``replay()``,
  median of 30) for no adapter, one adapter, 8 distinct; with the step's tile bucket and with
  the grid padded to the batch;
- ``host_meta``: host time of building and staging a step's LoRA metadata;
- ``projection``: each projection family of a layer at T tokens (qkv 3 slices, o, gate/up 2
  slices, down), CUDA graphs: the base GEMM alone and the marginal cost of add_lora on it;
  ``beside_marginal_us``: the delta beside the GEMM, added by the consumer (as captured decode
  steps run it), over the consumer without adapters;
- ``prefill``: one eager prefill step (16 prompts of 128 tokens: the engine benchmark's
  2,048-token chunk budget; and 16 prompts of 64-184 tokens), GPU time and host time to queue
  it, per case, attention by SDPA calls or by the paged prefill kernel; ``prefill_calls``:
  the host cost of one eager add_lora call, and ``prefill_cprofile`` the functions that
  spend the host time of the 8-adapter step;
- ``beside_gemm``: whole captured decode steps with 8 distinct adapters for every choice of
  the projection families whose delta runs beside our skinny GEMM rather than cuBLAS's;
- ``timeline``: a CUPTI trace of captured decode steps (torch.profiler over graph replays):
  per kernel class (gemm, lora, memset, other) the summed kernel time and how much of it
  ran beside a GEMM, and the step's span, busy time (union of kernels) and idle gaps.

Compare ``graph_replay`` at ``--contexts 192`` (the engine benchmark's mean: 128-token prompts,
128 new tokens) with the engine benchmark's decode tokens/s to see the host's share of a step;
at the default context of 1 token a replay leaves out the attention's KV reads.

    python bench/engine_step_profile.py [--batches 32 64] [--contexts 1 192]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import llama7b_engine, start_with_adapters  # noqa: E402
from executor_svc.engine import Engine  # noqa: E402
from executor_svc.model.context import PrefillChunk, StepContext  # noqa: E402
from executor_svc.model.layers import paged_attention  # noqa: E402
from executor_svc.model.layers.fused_ops import silu_and_mul  # noqa: E402
from executor_svc.model.layers.paged_prefill import build_prefill_meta  # noqa: E402
from kernels import add_lora, build_lora_meta, overlapped  # noqa: E402
from kernels._bench import graph_ms, traced_kernels  # noqa: E402
from kernels.lora_shrink_op import lora_shrink  # noqa: E402


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


def decode_graph(engine: Engine, case: str, b: int, pads: list[int]):
    """The captured decode step of batch b for ``case``'s plans, their metadata sent to it:
    (the graph, the host metadata); ``pads`` the tile-count buckets to pad to."""
    runner = engine.runner
    slots, weights = plans_for(case, b)
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
    runner.send_meta(g, host)
    return g, host


def set_context(engine: Engine, b: int, context: int) -> None:
    """Point the decode graphs' first ``b`` rows at ``context`` tokens of KV each, in distinct
    blocks (block 1 onwards), as an engine step at that context length reads them."""
    runner = engine.runner
    per_seq = -(-context // engine.block_size)
    if 1 + b * per_seq > engine.blocks.num_usable + 1:
        raise SystemExit(f"--context {context} at batch {b} needs more KV blocks")
    tables = 1 + torch.arange(b * per_seq, dtype=torch.int32, device="cuda").view(b, per_seq)
    runner.s_tables[:b, :per_seq] = tables
    runner.s_lens[:b] = context


def profile_graphs(engine: Engine, batches: list[int], context: int = 1) -> None:
    runner = engine.runner
    for b in batches:
        set_context(engine, b, context)
        emit(
            bench="graph_replay",
            batch=b,
            context=context,
            case="no_adapter",
            ms=round(replay_ms(runner.graphs[(b, 0, 0)].graph), 3),
        )
        for case in ("one_adapter", "8_distinct"):
            for pads in (runner.tile_pads[b], [b]):
                g, host = decode_graph(engine, case, b, pads)
                emit(
                    bench="graph_replay",
                    batch=b,
                    context=context,
                    case=case,
                    tile_pad=host.grid_tiles,
                    tiles=host.num_tiles,
                    ms=round(replay_ms(g.graph), 3),
                )


def _kernel_class(name: str) -> str:
    if "fused_linear_lora" in name:  # our skinny GEMM (beside the delta it runs without one)
        return "gemm"
    if "lora" in name:
        return "lora"
    if any(k in name for k in ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "cublas")):
        return "gemm"
    return "other"


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _overlap(span: tuple[float, float], union: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(span[1], b) - max(span[0], a)) for a, b in union)


def dump_layer(step: list, b: int, case: str, layer: int) -> None:
    """Every kernel of one decoder layer of a traced step, in start order: its stream, start
    (us from the layer's first kernel), duration and class (``timeline_layer`` rows). A layer
    opens with its input RMSNorm, the first of two ``_rms_norm_kernel`` launches a layer."""
    norms = [i for i, k in enumerate(step) if "_rms_norm_kernel" in k[3]]
    if len(norms) < 2 * layer + 3:
        emit(bench="timeline_layer", batch=b, case=case, error=f"{len(norms)} norms traced")
        return
    lo, hi = norms[2 * layer], norms[2 * layer + 2]
    t0 = step[lo][0]
    streams: dict = {}
    for a, e, cat, n, tid in step[lo:hi]:
        emit(bench="timeline_layer", batch=b, case=case, layer=layer,
             stream=streams.setdefault(tid, len(streams)), start_us=round(a - t0, 1),
             dur_us=round(e - a, 1), cls="memset" if cat == "gpu_memset" else _kernel_class(n),
             name=n[:48])  # fmt: skip
    emit(bench="timeline_layer_span", batch=b, case=case, layer=layer,
         span_us=round(step[hi][0] - t0, 1))  # fmt: skip


def profile_timeline(
    engine: Engine, batches: list[int], replays: int = 5, layer: int | None = None
) -> None:
    """Kernel time per class in a captured decode step, and how much of it hides beside GEMMs;
    with ``layer``, that layer's kernels one by one (:func:`dump_layer`)."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    for b in batches:
        for case in ("no_adapter", "8_distinct"):
            if case == "no_adapter":
                g = runner.graphs[(b, 0, 0)]
            else:
                g, _ = decode_graph(engine, case, b, runner.tile_pads[b])
            for _ in range(3):
                g.graph.replay()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(replays):
                    g.graph.replay()
                    torch.cuda.synchronize()
            kernels = traced_kernels(prof, ("kernel", "gpu_memset", "gpu_memcpy"))
            if not kernels:
                emit(bench="timeline", batch=b, case=case, error="no kernels traced")
                continue
            # replays are separated by host syncs: split at gaps > 50 us
            steps, cur = [], [kernels[0]]
            for k in kernels[1:]:
                if k[0] - max(c[1] for c in cur[-8:]) > 50:
                    steps.append(cur)
                    cur = []
                cur.append(k)
            steps.append(cur)
            rows = []
            for step in steps:
                gemm_union = _union(
                    [(a, e) for a, e, _, n, _ in step if _kernel_class(n) == "gemm"]
                )
                busy = _union([(a, e) for a, e, *_ in step])
                span = step[-1][1] - step[0][0]
                row = {"span_us": span, "busy_us": sum(e - a for a, e in busy)}
                for cls in ("gemm", "lora", "memset", "other"):
                    ks = [
                        (a, e)
                        for a, e, cat, n, _ in step
                        if (cls == "memset" and cat == "gpu_memset")
                        or (cat == "kernel" and _kernel_class(n) == cls)
                    ]
                    row[f"{cls}_n"] = len(ks)
                    row[f"{cls}_us"] = sum(e - a for a, e in ks)
                    if cls != "gemm":
                        row[f"{cls}_beside_gemm_us"] = sum(_overlap(s, gemm_union) for s in ks)
                rows.append(row)
            med = {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]}
            emit(bench="timeline", batch=b, case=case, steps=len(rows), **med)
            if layer is not None:
                dump_layer(steps[len(steps) // 2], b, case, layer)
            lora = {}
            for step in steps[len(steps) // 2 : len(steps) // 2 + 1]:
                for a, e, _, n, _ in step:
                    if _kernel_class(n) == "lora":
                        lora.setdefault(n[:40], []).append(e - a)
            for n, ds in lora.items():
                emit(bench="timeline_lora_kernel", batch=b, case=case, name=n, n=len(ds),
                     mean_us=round(statistics.mean(ds), 2), max_us=round(max(ds), 2))  # fmt: skip


# (out, in) of the 7B shape's projection families, as the GEMM beside their delta sees them
FAMILIES = {
    "qkv": (12288, 4096),
    "o": (4096, 4096),
    "gate_up": (22016, 4096),
    "down": (4096, 11008),
}


def profile_beside_gemm(
    engine: Engine,
    batches: list[int],
    context: int,
    combos: list[str] | None = None,
    cases: tuple[str, ...] = ("8_distinct",),
    rounds: int = 3,
) -> None:
    """Whole captured decode steps with adapters, for each choice of the projection families
    that run our skinny GEMM beside their delta (the rest cuBLAS's; ``combos`` as "o+down",
    "cublas" for none; default every subset), in rounds so that drift spreads over all
    choices (``beside_gemm`` rows, graph replay ms)."""
    import itertools

    import kernels.linear_lora_op as op

    runner = engine.runner
    chosen: set = set()
    default = op._triton_gemm_beside
    op._triton_gemm_beside = lambda x, w: tuple(w.shape) in chosen and x.shape[0] <= 64
    if combos is None:
        combos = [
            "+".join(c) or "cublas"
            for n in range(len(FAMILIES) + 1)
            for c in itertools.combinations(FAMILIES, n)
        ]
    try:
        for b in batches:
            set_context(engine, b, context)
            times: dict = {}
            for _ in range(rounds):
                times.setdefault(("none", "no_adapter"), []).append(
                    replay_ms(runner.graphs[(b, 0, 0)].graph)
                )
                for case in cases:
                    _, host = decode_graph(engine, case, b, runner.tile_pads[b])
                    for combo in combos:
                        chosen.clear()
                        chosen.update(FAMILIES[f] for f in combo.split("+") if f != "cublas")
                        g = runner.capture_decode(b, 1, host.grid_tiles)
                        runner.send_meta(g, host)
                        times.setdefault((combo, case), []).append(replay_ms(g.graph))
                        del g
            for (name, case), ts in times.items():
                emit(bench="beside_gemm", batch=b, context=context, case=case, triton_for=name,
                     ms=[round(t, 3) for t in ts], median=round(statistics.median(ts), 3))  # fmt: skip
    finally:
        op._triton_gemm_beside = default


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
            runner.send_meta(g, host)
        torch.cuda.synchronize()
        emit(bench="host_meta", batch=b, us=round((time.perf_counter() - t) / 200 * 1e6, 1))


def profile_projections(engine: Engine, batches: list[int]) -> None:
    # The engine's tensors (the branches' head word among them) are inference tensors: they
    # may only be written in inference mode.
    with torch.inference_mode():
        _profile_projections(engine, batches)


def _profile_projections(engine: Engine, batches: list[int]) -> None:
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
                # As a captured decode step runs it: the delta beside the GEMM, added by the
                # projection's consumer (an add stands for RoPE and the residual adds), over the
                # same consumer without adapters.
                other = torch.zeros(b, sum(m.out_sizes), device="cuda", dtype=torch.bfloat16)
                if name == "gate_up_proj":
                    plain = lambda m=m, x=x: silu_and_mul(m(x, None))  # noqa: E731
                    beside = lambda m=m, x=x, meta=meta: silu_and_mul(  # noqa: E731
                        *m.forward_beside(x, meta)
                    )
                else:
                    into = other if name in ("o_proj", "down_proj") else None
                    plain = lambda m=m, x=x, o=other: m(x, None) + o  # noqa: E731

                    def beside(m=m, x=x, meta=meta, into=into, o=other):
                        y, d = m.forward_beside(x, meta, into=into)
                        return y + (o if d is None else d)

                plain_ms = graph_ms(plain)
                with overlapped():  # warm-up outside the capture as the capture runs it
                    beside_ms = graph_ms(beside)
                emit(
                    bench="projection",
                    batch=b,
                    op=name,
                    case=case,
                    base_us=round(base * 1e3, 1),
                    lora_marginal_us=round((with_lora - base) * 1e3, 1),
                    beside_marginal_us=round((beside_ms - plain_ms) * 1e3, 1),
                )


def prefill_ctx(engine: Engine, lengths: list[int], case: str, paged: bool) -> StepContext:
    """A first-chunk prefill step of prompts of ``lengths`` tokens (no history), each in blocks
    of its own from block 1; ``paged``: attention by the paged prefill kernel, else by SDPA."""
    dev, bs = engine.model.device, engine.runner.block_size
    chunks, rows, start, block = [], [], 0, 1
    for n in lengths:
        table = list(range(block, block + -(-n // bs)))
        block += len(table)
        rows.append(table[0] * bs + torch.arange(n))
        chunks.append((start, n, 0, table))
        start += n
    ctx = StepContext(
        positions=torch.cat([torch.arange(n) for n in lengths]).to(dev),
        slot_mapping=torch.cat(rows).to(dev),
        prefills=[PrefillChunk(start=s, length=n) for s, n, _, _ in chunks],
        block_size=bs,
        prefill_meta=build_prefill_meta(chunks, dev) if paged else None,
    )
    if case != "no_adapter":
        slots, weights = plans_for(case, len(lengths))
        counts = np.array(lengths)
        ctx.lora = build_lora_meta(
            torch.from_numpy(np.repeat(slots, counts, axis=0)),
            torch.from_numpy(np.repeat(weights, counts, axis=0)),
            engine.model.num_slots,
            dev,
        )
    return ctx


PREFILL_LAYOUTS = {
    "16x128": [128] * 16,  # the engine benchmark's first step
    "16_mixed": [64 + 8 * i for i in range(16)],  # 64-184 tokens, 1,984 in all
}


def profile_prefill(engine: Engine, prompts: int = 16, length: int = 128) -> None:
    model, kv = engine.model, engine.runner.kv_caches
    for layout, lengths in PREFILL_LAYOUTS.items():
        ids = torch.randint(3, 32000, (sum(lengths),), device="cuda")
        for case in ("no_adapter", "one_adapter", "8_distinct"):
            for paged in (False, True):
                ctx = prefill_ctx(engine, lengths, case, paged)
                gpu, host = [], []
                for i in range(8):
                    torch.cuda.synchronize()
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    t = time.perf_counter()
                    a.record()
                    model(ids, ctx, kv)
                    b.record()
                    queued = time.perf_counter() - t
                    b.synchronize()
                    if i >= 2:
                        gpu.append(a.elapsed_time(b))
                        host.append(queued * 1e3)
                emit(
                    bench="prefill",
                    layout=layout,
                    tokens=sum(lengths),
                    case=case,
                    attention="paged_prefill" if paged else "sdpa",
                    gpu_ms=round(statistics.median(gpu), 2),
                    host_queue_ms=round(statistics.median(host), 2),
                )
    ids = torch.randint(3, 32000, (prompts * length,), device="cuda")
    ctx = prefill_ctx(engine, [length] * prompts, "8_distinct", engine.runner.paged_prefill)
    layer = model.layers[0]
    x = torch.randn(prompts * length, 4096, device="cuda", dtype=torch.bfloat16)
    v = layer.qkv_proj.slots
    y = layer.qkv_proj(x, None)
    for what, fn in (
        ("add_lora_qkv", lambda: add_lora(y, x, v.lora_a, v.lora_b, v.ranks, v.scales, ctx.lora)),
        ("lora_shrink_qkv", lambda: lora_shrink(x, v.lora_a, v.ranks, ctx.lora)),
        ("linear_qkv", lambda: layer.qkv_proj(x, None)),
    ):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        queued = (time.perf_counter() - t) / 20
        torch.cuda.synchronize()
        emit(bench="prefill_calls", op=what, host_us=round(queued * 1e6, 1))
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(3):
        model(ids, ctx, kv)
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv_: -kv_[1][2])[:15]
    for (file, line, fn), (_cc, nc, tt, ct, _) in rows:
        emit(
            bench="prefill_cprofile",
            fn=f"{Path(file).name}:{line}:{fn}",
            calls=nc // 3,
            tottime_ms=round(tt / 3 * 1e3, 2),
            cumtime_ms=round(ct / 3 * 1e3, 2),
        )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--only", nargs="+", default=["graphs", "host", "projections", "prefill"])
    ap.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=[1],
        help="graphs: KV tokens each decode row attends to (the engine benchmark's steps run at "
        "129-256)",
    )
    # also: timeline (a CUPTI trace of decode graph replays)
    ap.add_argument("--beside-combos", nargs="+", help="beside_gemm: e.g. cublas o+down")
    ap.add_argument("--beside-cases", nargs="+", default=["8_distinct"])
    ap.add_argument(
        "--dump-layer",
        type=int,
        help="timeline: also print every kernel of this decoder layer (stream, start, duration)",
    )
    ap.add_argument(
        "--decode-max-splits",
        type=int,
        help="cap the decode attention's context splits (1: one program per sequence and KV head, "
        "the kernel before the splits)",
    )
    args = ap.parse_args()
    if args.decode_max_splits:
        paged_attention.MAX_SPLITS = args.decode_max_splits
    engine = llama7b_engine(
        8,
        max_num_seqs=max(args.batches),
        max_model_len=max(512, max(args.contexts) + 32),
        kv_memory_bytes=max(
            2 << 30, max(args.batches) * (max(args.contexts) + 32) * 2 * 32 * 4096 * 2
        ),
        cuda_graph_batch_sizes=args.batches,
    )
    seconds = await start_with_adapters(engine, 8)
    emit(bench="engine_start", seconds=round(seconds, 1), gpu=torch.cuda.get_device_name())
    for part, fn in (
        ("graphs", lambda e, b: [profile_graphs(e, b, c) for c in args.contexts]),
        ("host", profile_host),
        ("projections", profile_projections),
        ("prefill", lambda e, _b: profile_prefill(e)),
        ("timeline", lambda e, b: profile_timeline(e, b, layer=args.dump_layer)),
        (
            "beside_gemm",
            lambda e, b: profile_beside_gemm(
                e, b, args.contexts[-1], args.beside_combos, tuple(args.beside_cases)
            ),
        ),
    ):
        if part in args.only:
            fn(engine, args.batches)
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
