"""Inputs and timers shared by the tuner (``python -m kernels.tune``) and the benchmark
(``bench/kernels_bench.py``): Llama-style projections, adapter plans, torch baselines."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing

FLUSH_MODES = ("dirty", "clean")
# How the timers empty the L2 cache before each timed call:
# - "dirty" (default; what triton.testing.do_bench does): zero a 256 MB buffer, which leaves
#   the L2 full of modified lines, so every line the timed kernels bring in first writes one
#   of those back to HBM: a memory-bound kernel's reads cost about twice their bytes;
# - "clean": read the same buffer, so the L2 holds unmodified lines that are dropped for
#   free, as in a decode step, where the delta's adapters replace the base weights the GEMM
#   before it just read.
_flush_mode = "dirty"
_FLUSH_KERNEL = {"dirty": "FillFunctor", "clean": "reduce_kernel"}  # names in CUPTI traces

# Llama-2-7B projections (in, out): attention (q/k/v/o) and MLP gate/up.
SHAPES = [(4096, 4096), (4096, 11008)]
TOKENS = [1, 16, 64, 256, 1024, 4096]
ADAPTERS = [1, 8, 64]


@dataclass
class Problem:
    x: torch.Tensor  # [T, in]
    y: torch.Tensor  # [T, out]
    a: torch.Tensor  # [slots, r, in]
    b: torch.Tensor  # [slots, out, r]
    ranks: torch.Tensor  # [1, slots] int32
    scales: torch.Tensor  # [1, slots] float32
    slots: torch.Tensor  # [T, K] int32 (CPU)
    weights: torch.Tensor  # [T, K] float32 (CPU)
    adapters: int  # distinct adapters actually used


def make_problem(
    tokens: int,
    in_f: int,
    out_f: int,
    *,
    rank: int = 16,
    adapters: int = 8,
    k: int = 1,
    num_slots: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device: str = "cuda",
) -> Problem:
    """Every one of ``min(adapters, T*K)`` adapters used; tokens shuffled (the builder sorts)."""
    g = torch.Generator().manual_seed(seed)
    d = max(1, min(adapters, tokens * k, num_slots))
    pick = torch.randperm(num_slots, generator=g)[:d]
    if k == 1:
        col = torch.arange(tokens) % d
        slots = pick[col[torch.randperm(tokens, generator=g)]].view(tokens, 1)
    else:  # K distinct adapters per token (needs d >= k), all d in use
        rows = [torch.randperm(d, generator=g)[:k] for _ in range(tokens)]
        slots = pick[torch.stack(rows)]
        slots[: min(tokens, d), 0] = pick[: min(tokens, d)]
        slots[: min(tokens, d), 1:] = pick[
            (torch.arange(min(tokens, d))[:, None] + torch.arange(1, k)) % d
        ]
    weights = torch.rand(tokens, k, generator=g) + 0.5
    weights = weights / weights.sum(1, keepdim=True)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)

    return Problem(
        x=rnd(tokens, in_f, std=1.0),
        y=rnd(tokens, out_f, std=1.0),
        a=rnd(num_slots, rank, in_f, std=in_f**-0.5),
        b=rnd(num_slots, out_f, rank, std=0.02),
        ranks=torch.full((1, num_slots), rank, dtype=torch.int32, device=device),
        scales=torch.full((1, num_slots), 2.0, device=device),
        slots=slots.to(torch.int32),
        weights=weights,
        adapters=d,
    )


def set_flush_mode(mode: str) -> None:
    """Choose how every timer here empties the L2 before a timed call (see FLUSH_MODES)."""
    global _flush_mode
    if mode not in FLUSH_MODES:
        raise ValueError(f"flush mode {mode!r}; expected one of {FLUSH_MODES}")
    _flush_mode = mode


def _l2_flusher():
    """A callable that empties the L2 the current way, and the name its kernel has in traces."""
    buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    if _flush_mode == "dirty":
        return buf.zero_, _FLUSH_KERNEL["dirty"]
    buf.zero_()
    return (lambda: buf.max()), _FLUSH_KERNEL["clean"]


def bench_ms(fn, *, warmup: int = 25, rep: int = 100) -> float:
    """Median time of fn (ms), L2 flushed before every call: triton.testing.do_bench in the
    "dirty" flush mode; the same protocol (``warmup`` and ``rep`` in ms) with a read-only
    flush in the "clean" one."""
    if _flush_mode == "dirty":
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    flush, _ = _l2_flusher()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)  # ms a call, flush included (as do_bench)
    for _ in range(max(1, int(warmup / est))):
        fn()
    n = max(1, int(rep / est))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]  # fmt: skip
    for s, e in events:
        flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return float(times[len(times) // 2])


def capture(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph (after a run on the default stream and one on a side one)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_ms(fn, *, rep: int = 100, warmup: int = 25) -> float:
    """Median time of a CUDA-graph replay of fn (no launch overhead), L2 flushed."""
    return bench_ms(capture(fn).replay, rep=rep, warmup=warmup)


def paired_replay_ms(
    base: torch.cuda.CUDAGraph,
    both: torch.cuda.CUDAGraph,
    *,
    pairs: int = 100,
    warmup: int = 10,
    warmup_ms: float = 25.0,
) -> tuple[float, float, float]:
    """(median base, median both, median of the per-pair differences), ms: the two graphs
    replayed in alternation, L2 flushed (the current flush mode) before each replay, the
    order swapped every pair.

    The difference of two separate medians (``graph_ms(both) - graph_ms(base)``) carries the
    GPU's drift between the two measurements: on the power-capped H100 a 0.2-0.5 ms prefill
    GEMM moved by 20-50% from run to run, more than the delta it rides on
    (docs/benchmarks.md, seventh pass). Pairs taken back to back see the same clocks.

    Before timing, pairs are replayed for at least ``warmup`` pairs and ``warmup_ms`` of wall
    time (do_bench's 25 ms): after the seconds a case spends compiling, the idle GPU's
    clocks are down, and ten pairs of decode-sized graphs (well under a millisecond) left
    whole rows timed at a fraction of the clock (nineteenth pass: a 24 us GEMM replayed at
    191 us, and the delta beside it at 8.8 us instead of about 5)."""
    flush, _ = _l2_flusher()
    t0, done, batch = time.perf_counter(), 0, max(1, warmup)
    while done < warmup or time.perf_counter() - t0 < warmup_ms / 1e3:
        for _ in range(batch):
            base.replay()
            both.replay()
        torch.cuda.synchronize()  # wall time counts replays run, not replays queued
        done += batch
    times: dict[str, list[float]] = {"base": [], "both": []}
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(2 * pairs)
    ]
    order = []
    for i in range(pairs):
        for name in ("base", "both") if i % 2 == 0 else ("both", "base"):
            flush()
            start, end = events[len(order)]
            start.record()
            (base if name == "base" else both).replay()
            end.record()
            order.append(name)
    torch.cuda.synchronize()
    for name, (start, end) in zip(order, events, strict=True):
        times[name].append(start.elapsed_time(end))
    diffs = sorted(b - a for a, b in zip(times["base"], times["both"], strict=True))
    mid = len(diffs) // 2
    return (
        sorted(times["base"])[mid],
        sorted(times["both"])[mid],
        diffs[mid],
    )


@triton.jit
def _stream_read_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """out[p] = the sum of program p's ITERS x BLOCK consecutive elements of src (fp32): a
    plain streaming read, every load of a program issued before its first add."""
    base = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


# (BLOCK, ITERS, num_warps) tried for the streaming read; the fastest counts
_STREAM_CONFIGS = ((1024, 4, 4), (2048, 4, 8), (1024, 8, 4), (4096, 2, 8))


def stream_read(src: torch.Tensor, block: int = 1024, iters: int = 4, num_warps: int = 4):
    """Per-program sums of a float32 tensor, read once by :func:`_stream_read_kernel`."""
    n = src.numel()
    out = torch.empty(triton.cdiv(n, block * iters), dtype=torch.float32, device=src.device)
    _stream_read_kernel[(out.numel(),)](src, out, n, BLOCK=block, ITERS=iters,
                                        num_warps=num_warps)  # fmt: skip
    return out


def read_floor_marginal_ms(nbytes: int, before, *, pairs: int = 100) -> float:
    """What one streaming read of ``nbytes`` (a fresh buffer, so nothing of it is in the L2)
    adds after ``before`` in a CUDA graph: the median paired difference (paired_replay_ms),
    the fastest of a few launch shapes. A floor for a delta that must read that many bytes
    of adapter weights after its GEMM, at the rate the hardware gives a read of that size."""
    src = torch.randn(max(1, nbytes // 4), device="cuda")
    base = capture(before)
    best = float("inf")
    for block, iters, warps in _STREAM_CONFIGS:
        both = capture(lambda b=block, i=iters, w=warps: (before(), stream_read(src, b, i, w)))
        best = min(best, paired_replay_ms(base, both, pairs=pairs)[2])
    return best


def eager_cpu_us(fn, calls: int = 50) -> float:
    """Host time of one eager call (launch overhead), GPU queue not waited for."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def gather_bmm(p: Problem, idx: torch.Tensor, scale: torch.Tensor) -> None:
    """Baseline: gather each token's A and B, two bmm (K=1)."""
    a, b = p.a[idx], p.b[idx]  # [T, r, in], [T, out, r]
    h = torch.bmm(p.x.unsqueeze(1), a.transpose(1, 2))
    p.y += torch.bmm(h, b.transpose(1, 2)).squeeze(1) * scale[:, None]


def per_adapter_loop(p: Problem, groups: list[tuple[int, torch.Tensor]]) -> None:
    """Baseline (PEFT style): one sub-batch per adapter, index_add back (K=1)."""
    for slot, rows, scale in groups:
        xs = p.x.index_select(0, rows)
        d = (xs @ p.a[slot].T) @ p.b[slot].T * scale
        p.y.index_add_(0, rows, d)


def baseline_inputs(p: Problem) -> tuple[torch.Tensor, torch.Tensor, list]:
    idx = p.slots[:, 0].to(p.x.device).long()
    scale = (p.scales[0, idx] * p.weights[:, 0].to(p.x.device)).to(p.x.dtype)
    groups = [
        (
            int(s),
            (p.slots[:, 0] == s).nonzero()[:, 0].to(p.x.device),
            float(p.scales[0, s]) * float(p.weights[0, 0]),
        )  # python floats, as PEFT
        for s in p.slots[:, 0].unique().tolist()
    ]
    return idx, scale, groups


def adapter_bytes(p: Problem) -> int:
    """The distinct adapters' A and B: what a delta must bring from HBM after its GEMM (x and
    y are then in the L2)."""
    in_f, out_f, r = p.x.shape[1], p.y.shape[1], p.a.shape[1]
    return p.adapters * r * (in_f + out_f) * p.x.element_size()


def lora_bytes(p: Problem, k: int = 1) -> int:
    """Fewest bytes: x read, y read and written, the distinct adapters' A and B."""
    t, in_f = p.x.shape
    out_f, e = p.y.shape[1], p.x.element_size()
    return e * (t * in_f + 2 * t * out_f) + adapter_bytes(p)


def base_bytes(t: int, in_f: int, out_f: int, element_size: int = 2) -> int:
    """Fewest bytes of the base projection y = x @ W.T: x and W read, y written. The delta's
    bytes over these are the ratio to the base projection that the delta reaches if both
    move their bytes at the same rate."""
    return element_size * (t * in_f + out_f * in_f + t * out_f)


def traced_kernels(prof, cats: tuple[str, ...] = ("kernel",)) -> list[tuple]:
    """The GPU activities of a finished ``torch.profiler.profile`` whose category is in
    ``cats`` ("kernel", "gpu_memset", "gpu_memcpy"), sorted by start: (start us, end us,
    category, name, stream)."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text()).get("traceEvents", [])
    return sorted(
        (e["ts"], e["ts"] + e["dur"], e.get("cat", ""), e.get("name", ""), e.get("tid"))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in cats
    )


def kernel_timeline(graph: torch.cuda.CUDAGraph, replays: int = 20) -> list[dict]:
    """Each kernel of a graph replay, in launch order: name, start and end (us from the
    first kernel's start) and duration, medians over ``replays`` (CUPTI through
    torch.profiler; L2 flushed before each replay). Shows where a delta's time goes: the gap
    after the GEMM, each kernel's length, how far a dependent launch overlaps its primary."""
    import statistics

    from torch.profiler import ProfilerActivity, profile

    flush, flush_kernel = _l2_flusher()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            flush()
            torch.cuda.synchronize()
            graph.replay()
            torch.cuda.synchronize()
    runs, cur = [], []  # per replay: (start, end, name), us from its first kernel's start
    for start, end, _, name, _ in traced_kernels(prof):
        if flush_kernel in name:  # the flush: a replay's kernels follow
            if cur:
                runs.append(cur)
            cur = []
        else:
            t0 = cur[0][3] if cur else start
            cur.append((start - t0, end - t0, name, t0))
    if cur:
        runs.append(cur)
    n = statistics.mode(len(r) for r in runs) if runs else 0
    runs = [r for r in runs if len(r) == n]  # (a replay the profiler cut short)
    out = []
    for i in range(n):
        start = statistics.median(r[i][0] for r in runs)
        end = statistics.median(r[i][1] for r in runs)
        dur = statistics.median(r[i][1] - r[i][0] for r in runs)
        out.append(
            {
                "name": runs[0][i][2][:48],
                "start_us": round(start, 2),
                "end_us": round(end, 2),
                "dur_us": round(dur, 2),
            }
        )
    return out
