"""Benchmark (and sweep) of fused_linear_lora: the base projection with the delta in its epilogue.

    python bench/fused_linear_bench.py [--sweep | --sweep-shrink] [--tokens T ...] [--out results.jsonl]

One JSON line per case. Projections of Llama-2-7B as the engine runs them (bf16, rank 16):
o (4096->4096), down (11008->4096), qkv (4096->3x4096, three slices), gate/up (4096->2x11008,
two slices); tokens {1, 16, 32, 64, 128, 256} x distinct adapters {1, 8, 64} (capped at T*K),
K=1 and 2. Every time is the median of a CUDA-graph replay (triton.testing.do_bench, L2
flushed), all in the same run:

- cublas_ms: F.linear (cuBLAS) alone; triton_ms: fused_linear_lora without adapters (our
  skinny GEMM alone);
- unfused_ms: F.linear then add_lora on one stream (shrink + expand after the GEMM);
  beside_ms: linear_beside_lora with the delta into a residual plus the residual add, minus
  nothing (compare with cublas_add_ms, the F.linear + the same add);
- fused_ms: fused_linear_lora (the shrink in its main loop for steps of few adapters, else the
  shrink kernel + the GEMM); shrink_ms: the shrink kernel alone; fused_nopdl_ms: the pair
  without programmatic dependent launch; with --placements, fused_in_loop_ms and
  fused_apart_ms: the shrink forced into the main loop (up to 8 adapters) and apart;
- ratio_fused = fused_ms / cublas_ms (the stretch goal: <= 1.1); ratio_delta = (fused_ms -
  cublas_ms) / cublas_ms (the kernel issue's metric: what the adapters add over the base
  projection); ratio_epilogue = (fused_ms - triton_ms) / cublas_ms (what the delta costs
  inside our own GEMM); weight_GBps: the weight's bytes over triton_ms;
- bytes_ratio: the fused kernel's fewest bytes (x, W and the distinct adapters' A and B read,
  y written) over the base projection's (x and W read, y written), the ratio_fused it reaches
  if it moves its bytes at cuBLAS's rate; stretch_bytes_ok: bytes_ratio <= 1.1 (otherwise no
  kernel that reads those weights once meets the stretch goal at the base projection's rate).
A last line (case fused_linear_summary) counts the rows that meet the stretch goal, of all
rows and of those whose bytes allow it.

--sweep [--write] times the GEMM's launch parameters (no adapters, then the best few with 8
adapters) and prints the best per (projection, tokens) as config entries for kernels/configs/
(--write puts them there). --sweep-shrink [--write] then tunes each entry's shrink shape
(SHRINK_SPLIT_K, SHRINK_BLOCK_K, SHRINK_STAGES, SHRINK_WARPS) with 1 and 8 adapters.
--sweep-loop [--write] then sets each entry's LOOP_USED: the counts of distinct adapters (1,
2) for which the shrink in the GEMM's main loop beat the shrink kernel beside it.
Never asserts on time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import (  # noqa: E402
    add_lora,
    build_lora_meta,
    fused_linear_lora,
    linear_beside_lora,
    lora_shrink,
)
from kernels._bench import base_bytes, graph_ms, make_problem  # noqa: E402
from kernels._launch import compile_only  # noqa: E402
from kernels.config import (  # noqa: E402
    CONFIG_DIR,
    _lookup,
    gpu_config_name,
    kernel_config,
    load_config,
)
from kernels.fused_linear_lora_op import fused_shrink_config  # noqa: E402

# name: (in, [out per slice])
PROJECTIONS = {
    "o": (4096, [4096]),
    "down": (11008, [4096]),
    "qkv": (4096, [4096, 4096, 4096]),
    "gate_up": (4096, [11008, 11008]),
}
TOKENS = [1, 16, 32, 64, 128, 256]
# --placements times the shrink in the main loop up to this many distinct adapters
MAX_IN_LOOP_ADAPTERS = 8


def operands(name: str, tokens: int, adapters: int, k: int, seed: int = 0):
    in_f, outs = PROJECTIONS[name]
    ps = [make_problem(tokens, in_f, o, adapters=adapters, k=k, seed=seed) for o in outs]
    p = ps[0]
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(sum(outs), in_f, generator=g) * in_f**-0.5).to(torch.bfloat16).cuda()
    lora = ([q.a for q in ps], [q.b for q in ps])
    ranks = torch.cat([q.ranks for q in ps]).contiguous()
    scales = torch.cat([q.scales for q in ps]).contiguous()
    meta = build_lora_meta(p.slots, p.weights, p.a.shape[0], torch.device("cuda"))
    return p.x, w, lora, ranks, scales, meta, p.adapters


def run_case(name: str, tokens: int, adapters: int, k: int, rep: int,
             placements: bool = False) -> dict:  # fmt: skip
    x, w, (la, lb), ranks, scales, meta, d = operands(name, tokens, adapters, k)
    resid = torch.zeros(tokens, w.shape[0], dtype=x.dtype, device=x.device)
    out = {"case": "fused_linear", "proj": name, "in": x.shape[1], "out": w.shape[0],
           "tokens": tokens, "adapters": d, "k": k}  # fmt: skip
    out["cublas_ms"] = graph_ms(lambda: F.linear(x, w), rep=rep)
    out["triton_ms"] = graph_ms(lambda: fused_linear_lora(x, w, None, None, None, None, None,
                                                          None), rep=rep)  # fmt: skip

    def unfused():
        y = F.linear(x, w)
        add_lora(y, x, la, lb, ranks, scales, meta)

    def beside():
        y, into = linear_beside_lora(x, w, None, la, lb, ranks, scales, meta, resid)
        return y + into

    out["unfused_ms"] = graph_ms(unfused, rep=rep)
    out["beside_ms"] = graph_ms(beside, rep=rep)
    out["cublas_add_ms"] = graph_ms(lambda: F.linear(x, w) + resid, rep=rep)

    def fused():
        return fused_linear_lora(x, w, None, la, lb, ranks, scales, meta)

    def fused_ms_with(switch: str, value: str) -> float:
        """The pair timed with one of its environment switches forced."""
        os.environ[switch] = value
        try:
            return graph_ms(fused, rep=rep)
        finally:
            del os.environ[switch]

    out["fused_ms"] = graph_ms(fused, rep=rep)
    # diagnostics: the fused path's shrink alone, and the pair without programmatic launch
    cfg = kernel_config("fused", tokens, w.shape[0], x.device, x.shape[1])
    shrink_cfg = fused_shrink_config(cfg, tokens, x.shape[1], x.device)
    out["shrink_ms"] = graph_ms(lambda: lora_shrink(x, la, ranks, meta, config=shrink_cfg), rep=rep)
    out["fused_nopdl_ms"] = fused_ms_with("LORASERVE_KERNELS_PDL", "0")
    if placements:  # the fused pair with the shrink forced into the main loop, and apart
        if d <= MAX_IN_LOOP_ADAPTERS:  # past that, the loop's late shrink: slow by design
            out["fused_in_loop_ms"] = fused_ms_with("LORASERVE_KERNELS_FUSED_IN_LOOP", "1")
        out["fused_apart_ms"] = fused_ms_with("LORASERVE_KERNELS_FUSED_IN_LOOP", "0")
    want = F.linear(x, w)
    add_lora(want, x, la, lb, ranks, scales, meta)
    got = fused()
    out["max_abs_diff_vs_unfused"] = float((got.float() - want.float()).abs().max())
    base = out["cublas_ms"]
    out["ratio_fused"] = out["fused_ms"] / base
    out["ratio_delta"] = (out["fused_ms"] - base) / base
    out["ratio_epilogue"] = (out["fused_ms"] - out["triton_ms"]) / base
    out["ratio_unfused_delta"] = (out["unfused_ms"] - base) / base
    out["ratio_beside_delta"] = (out["beside_ms"] - out["cublas_add_ms"]) / base
    out["bytes_ratio"] = fused_bytes_ratio(x.shape[0], w.shape, la, lb, d)
    out["stretch_bytes_ok"] = out["bytes_ratio"] <= 1.1
    out["weight_GBps"] = w.numel() * w.element_size() / out["triton_ms"] / 1e6
    out["cublas_weight_GBps"] = w.numel() * w.element_size() / base / 1e6
    return out


def fused_bytes_ratio(tokens: int, w_shape, lora_a, lora_b, adapters: int) -> float:
    """(x, W, the distinct adapters' A and B read, y written) over (x, W read, y written):
    every slice has an A ([slots, r, in]) and a B ([slots, out_s, r]) per adapter."""
    out_f, in_f = w_shape
    base = base_bytes(tokens, in_f, out_f)
    per_adapter = sum(a[0].numel() + b[0].numel() for a, b in zip(lora_a, lora_b, strict=True))
    return (base + adapters * per_adapter * lora_a[0].element_size()) / base


SWEEP_TOKENS = [16, 32, 64]
SHRINK_SPLITS = [2, 4, 8]
SLOTS_PER_STEP = [1, 4, 8]


def sweep_grid() -> list[dict]:
    return [
        {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
        for bn, bk, nw, ns in itertools.product([16, 32, 64], [128, 256], [4, 8], [3, 4, 5])
    ]


def _timed(ops: tuple, cfg: dict | None, lora: bool, rep: int) -> float:
    x, w, (la, lb), ranks, scales, meta, _ = ops
    if cfg is None:
        return graph_ms(lambda: F.linear(x, w), rep=rep, warmup=5)
    args = (la, lb, ranks, scales, meta) if lora else (None,) * 5
    return graph_ms(lambda: fused_linear_lora(x, w, None, *args, config=cfg), rep=rep, warmup=5)


def sweep(tokens: list[int], rep: int, write: bool) -> None:
    """Time every config of the grid without adapters; then the best 3 of each case again
    with 8 adapters (K=1) and each of SHRINK_SPLITS x SLOTS_PER_STEP; keep the best with adapters per
    (projection, tokens). --write puts them in the GPU's config file (kernels/configs/),
    replacing its "fused" entries. Variants compile on a thread pool before each phase."""
    grid = sweep_grid()
    cases = {(n, t): operands(n, t, 8, 1) for n, t in itertools.product(PROJECTIONS, tokens)}
    with compile_only():
        for ops, cfg in itertools.product(cases.values(), grid):
            fused_linear_lora(ops[0], ops[1], None, None, None, None, None, None, config=cfg)
    best3 = {}
    for key, ops in cases.items():
        timed = []
        for cfg in grid:
            try:
                timed.append((_timed(ops, cfg, False, rep), cfg))
            except Exception as e:  # out of shared memory or registers: skip the config
                print(json.dumps({"sweep": "skip", "cfg": cfg, "error": repr(e)[:160]}))
        timed.sort(key=lambda v: v[0])
        best3[key] = (timed[:3], timed[-1][0])
    lora_cfgs = {
        key: [
            ({**cfg, "SHRINK_SPLIT_K": sk, "SLOTS_PER_STEP": sg}, ms)
            for ms, cfg in top
            for sk, sg in itertools.product(SHRINK_SPLITS, SLOTS_PER_STEP)
        ]
        for key, (top, _) in best3.items()
    }
    with compile_only():
        for key, cfgs in lora_cfgs.items():
            x, w, (la, lb), ranks, scales, meta, _ = cases[key]
            for cfg, _ in cfgs:
                fused_linear_lora(x, w, None, la, lb, ranks, scales, meta, config=cfg)
    entries = []
    for (name, t), cfgs in lora_cfgs.items():
        ops = cases[name, t]
        ms_l, ms, cfg = min(((_timed(ops, c, True, rep), ms, c) for c, ms in cfgs),
                            key=lambda v: v[0])  # fmt: skip
        entry = {"max_tokens": t, "dim": ops[1].shape[0], "in": ops[0].shape[1], **cfg}
        entries.append(entry)
        print(json.dumps({"sweep": "best", "proj": name, "tokens": t, "lora_ms": ms_l,
                          "base_ms": ms, "cublas_ms": _timed(ops, None, False, rep),
                          "worst_base_ms": best3[name, t][1], "entry": entry}), flush=True)  # fmt: skip
    if write:
        path = CONFIG_DIR / f"{gpu_config_name('cuda')}.json"
        cfg_file = json.loads(path.read_text())
        cfg_file["fused"] = entries
        path.write_text(json.dumps(cfg_file, indent=1) + "\n")
        print(json.dumps({"sweep": "written", "path": str(path), "entries": len(entries)}))


# The shrink's launch shapes --sweep-shrink tries on the fused path
SHRINK_SHAPES = [
    {"SHRINK_SPLIT_K": sk, "SHRINK_BLOCK_K": bk, "SHRINK_STAGES": st, "SHRINK_WARPS": nw}
    for sk, bk, st, nw in itertools.product([1, 2, 4, 8], [256, 512], [2, 4], [4, 8])
]


def sweep_shrink(rep: int, write: bool) -> None:
    """Per fused entry of the GPU's config file, keep its GEMM and walk parameters and time
    every shrink shape of SHRINK_SHAPES on the entry's projection at its token bound, with one
    adapter and with 8 (K=1); keep the shape with the lowest sum of the two. The shrink runs
    beside the GEMM there, so its best shape is not the unfused path's. --write updates the
    entries in place. Variants compile on a thread pool first."""
    by_shape = {(ins, sum(outs)): name for name, (ins, outs) in PROJECTIONS.items()}
    path = CONFIG_DIR / f"{gpu_config_name('cuda')}.json"
    cfg_file = json.loads(path.read_text())
    plan = []
    for entry in cfg_file["fused"]:
        name = by_shape.get((entry.get("in"), entry["dim"]))
        if name is None:
            continue
        base = {k: v for k, v in entry.items() if k not in ("max_tokens", "dim", "in")}
        cases = [operands(name, entry["max_tokens"], d, 1) for d in (1, 8)]
        plan.append((entry, name, base, cases))
    with compile_only():
        for _, _, base, cases in plan:
            for ops, shape in itertools.product(cases, SHRINK_SHAPES):
                x, w, (la, lb), ranks, scales, meta, _ = ops
                fused_linear_lora(x, w, None, la, lb, ranks, scales, meta, config={**base, **shape})
    for entry, name, base, cases in plan:
        timed = []
        for shape in [{}, *SHRINK_SHAPES]:  # {}: the entry as it is
            try:
                ms = sum(_timed(ops, {**base, **shape}, True, rep) for ops in cases)
            except Exception as e:  # out of shared memory or registers: skip the shape
                print(json.dumps({"sweep": "skip", "shape": shape, "error": repr(e)[:160]}))
                continue
            timed.append((ms, shape))
        (best_ms, best), (now_ms, _) = min(timed, key=lambda v: v[0]), timed[0]
        entry.update(best)
        print(json.dumps({"sweep": "shrink", "proj": name, "tokens": entry["max_tokens"],
                          "sum_ms_before": now_ms, "sum_ms": best_ms, "entry": entry}),
              flush=True)  # fmt: skip
    if write:
        path.write_text(json.dumps(cfg_file, indent=1) + "\n")
        print(json.dumps({"sweep": "written", "path": str(path), "entries": len(plan)}))


def sweep_loop(rep: int, write: bool, rounds: int = 2) -> None:
    """Per fused entry of the GPU's config file, and per count of distinct adapters the GEMM's
    main loop can carry (1 and 2, rank 16), time the pair with the shrink in the loop and
    apart (``rounds`` times each, interleaved) at the token counts of TOKENS in the entry's
    bucket: one adapter with K=1, two with K=1 (where T > 1) and K=2. The loop takes a count
    where the sum of its times is 1% below apart's; --write sets the entry's LOOP_USED to
    those counts (the loop's shared memory and registers can cost an SM a program, so the
    answer depends on the shape, not only on the adapters)."""
    by_shape = {(ins, sum(outs)): name for name, (ins, outs) in PROJECTIONS.items()}
    path = CONFIG_DIR / f"{gpu_config_name('cuda')}.json"
    cfg_file = json.loads(path.read_text())
    fused = sorted(cfg_file["fused"], key=lambda e: (e["dim"], e.get("in", 0), e["max_tokens"]))
    low = {}
    for entry in fused:  # each entry covers the tokens above the last bound of its shape
        shape = (entry["dim"], entry.get("in"))
        lo, low[shape] = low.get(shape, 0), entry["max_tokens"]
        name = by_shape.get((entry.get("in"), entry["dim"]))
        if name is None:
            continue
        base = {k: v for k, v in entry.items() if k not in ("max_tokens", "dim", "in")}
        tokens = [t for t in TOKENS if lo < t <= entry["max_tokens"]]
        used_ok = []
        for used in (1, 2):
            cases = [operands(name, t, used, k) for t in tokens for k in (1, 2)
                     if (k == 1 or used == 2) and (used == 1 or k == 2 or t > 1)]  # fmt: skip
            sums = {True: 0.0, False: 0.0}
            for _ in range(rounds):
                for ops in cases:
                    for in_loop in (True, False):
                        sums[in_loop] += _timed(ops, {**base, "IN_LOOP": int(in_loop)}, True, rep)
            if sums[True] < 0.99 * sums[False]:
                used_ok.append(used)
            print(json.dumps({"sweep": "loop", "proj": name, "max_tokens": entry["max_tokens"],
                              "tokens": tokens, "used": used, "loop_ms": sums[True] / rounds,
                              "apart_ms": sums[False] / rounds}), flush=True)  # fmt: skip
        entry["LOOP_USED"] = used_ok
        print(json.dumps({"sweep": "loop_used", "proj": name, "entry": entry}), flush=True)
    if write:
        path.write_text(json.dumps(cfg_file, indent=1) + "\n")
        print(json.dumps({"sweep": "written", "path": str(path)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-shrink", action="store_true",
                    help="tune the fused path's shrink shape per config entry")  # fmt: skip
    ap.add_argument(
        "--sweep-loop",
        action="store_true",
        help="per fused entry, the adapter counts whose shrink rides the main loop",
    )
    ap.add_argument("--write", action="store_true", help="with a sweep: update the config")
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--proj", nargs="+", default=list(PROJECTIONS))
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--placements", action="store_true",
                    help="also time the pair with the shrink forced into the GEMM's main loop "
                    "(fused_in_loop_ms, up to 8 adapters) and apart (fused_apart_ms)")  # fmt: skip
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                    help="override a key of every fused config entry (e.g. SLOT_LOOP=0)")  # fmt: skip
    args = ap.parse_args()
    if args.set:  # patch the loaded (cached) config in place, then forget cached lookups
        overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
        for entry in load_config(gpu_config_name("cuda"))["fused"]:
            entry.update(overrides)
        _lookup.cache_clear()
    if args.sweep_shrink:
        sweep_shrink(args.rep, args.write)
        return
    if args.sweep_loop:
        sweep_loop(args.rep, args.write)
        return
    if args.sweep:
        sweep(args.tokens if args.tokens != TOKENS else SWEEP_TOKENS, args.rep, args.write)
        return
    sink = args.out.open("w") if args.out else None
    rows = []
    for name, t, d, k in itertools.product(args.proj, args.tokens, args.adapters, args.k):
        if k == 2 and d == 1:  # K=2 needs two adapters per token
            continue
        rows.append(run_case(name, t, d, k, args.rep, args.placements))
        line = json.dumps(rows[-1])
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
    print(json.dumps(stretch_summary(rows)), flush=True)


def stretch_summary(rows: list[dict]) -> dict:
    """The stretch goal over a run's rows: how many reach ratio_fused <= 1.1, of all rows and
    of those whose bytes allow it (stretch_bytes_ok)."""
    reachable = [r for r in rows if r["stretch_bytes_ok"]]
    return {
        "case": "fused_linear_summary",
        "rows": len(rows),
        "met": sum(r["ratio_fused"] <= 1.1 for r in rows),
        "reachable_rows": len(reachable),
        "reachable_met": sum(r["ratio_fused"] <= 1.1 for r in reachable),
    }


if __name__ == "__main__":
    main()
