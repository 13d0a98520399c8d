"""Sweep the kernels' launch parameters on this GPU and write kernels/configs/<GPU>.json.

    python -m kernels.tune [--out-dir kernels/configs] [--quick] [--wide-only | --column-only]

For every token count of the benchmark (1 ... 4096) and every tile height ``block_m``: the
shrink configs are timed alone, then the expand configs inside the whole ``add_lora`` (the
expand overlaps the shrink's tail through programmatic dependent launch, so it is judged
together with it) for each ``out``; the ``block_m`` with the smallest total wins. Problems:
Llama-2-7B projections (in=4096), rank 16, K=1, adapters {1, 8, 64} (capped at T); the score
is the sum of the times over adapter counts. Every time is the median of
triton.testing.do_bench over replays of a CUDA graph holding one call (L2 flushed before each):
eager timings of such short kernels measure Python's launch overhead, not the GPU.
Then the *wide* shrink entries (``min_work``, see kernels.config): per token bucket of 16 or
more tokens, the shrink configs timed in the whole ``add_lora`` on steps with many tiles (64
distinct adapters, K=1; top-2 plans over 8 adapters, K=2), each with the bucket's tuned
expand; an entry is written where it beats the bucket's own shrink by 3% or more.
``--wide-only`` redoes just these and keeps the rest of the file. Then the *column* shrink
entries (``mode: column``, see kernels.config): per token bucket of 256 or more tokens, the
shrink configs timed the same way on column-mode steps (top-2 over 64 adapters), against what
the lookup gives those launches without such entries; written where 3% or more faster, for
column launches of at least that step's work (``min_work``).
``--column-only`` redoes just those. One JSON line per measurement goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kernels import add_lora, build_lora_meta, lora_shrink
from kernels._bench import ADAPTERS, SHAPES, TOKENS, graph_ms, make_problem
from kernels.config import CONFIG_DIR, _pick, block_m_in, gpu_config_name, launch_params

SHRINK = [  # (BLOCK_K, SPLIT_K, num_warps, num_stages)
    (256, 16, 4, 1),
    (128, 32, 4, 1),
    (128, 16, 4, 2),
    (256, 8, 4, 2),
    (128, 8, 4, 3),
    (256, 4, 4, 3),
    (128, 4, 4, 3),
    (128, 2, 4, 3),
    (128, 1, 4, 4),
]
EXPAND = [  # (BLOCK_N, num_warps, num_stages)
    (64, 4, 1),
    (128, 4, 1),
    (256, 4, 1),
    (256, 8, 1),
    (512, 8, 1),
]


# Steps with many tiles (adapters, K, mode) that the wide shrink entries are tuned on, and
# how much faster than the bucket's own shrink an entry must be to be written.
WIDE = [(64, 1, "plan"), (8, 2, "plan")]
MIN_GAIN = 0.03
# Column-mode steps (adapters, K) that the column shrink entries are tuned on, from this many
# tokens (fewer tokens over 64 adapters run K=2 in plan mode or as the min_work entries' steps).
COLUMN = [(64, 2)]
COLUMN_FROM_TOKENS = 256


def block_ms_for(tokens: int) -> list[int]:
    return [b for b in (16, 32, 64, 128) if b <= max(16, tokens) and (tokens < 1024 or b >= 32)]


def _shrink_cfg(c: tuple) -> dict:
    return {"BLOCK_K": c[0], "SPLIT_K": c[1], "num_warps": c[2], "num_stages": c[3]}


def _expand_cfg(c: tuple) -> dict:
    return {"BLOCK_N": c[0], "num_warps": c[1], "num_stages": c[2]}


def _time(fn, rep: int) -> float:
    try:
        return graph_ms(fn, rep=rep, warmup=3)
    except Exception as e:  # a config that does not compile or launch (e.g. shared memory)
        print(json.dumps({"tune": "error", "error": repr(e)[:200]}))
        return float("inf")


def tune(quick: bool = False) -> dict:
    in_f = SHAPES[0][0]
    outs = [o for i, o in SHAPES if i == in_f]
    rep = 5 if quick else 10
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "block_m": [],
        "shrink": [],
        "expand": [],
        "notes": f"written by python -m kernels.tune, {time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}; times: CUDA-graph replays, L2 flushed",
    }
    for t in TOKENS:
        d_list = sorted({min(d, t) for d in ADAPTERS})
        probs = {(o, d): make_problem(t, in_f, o, adapters=d, seed=d) for o in outs for d in d_list}
        best = None
        for bm in block_ms_for(t):
            metas = {
                d: build_lora_meta(
                    probs[outs[0], d].slots, probs[outs[0], d].weights, 64, block_m=bm
                )
                for d in d_list
            }
            shr = []
            for c in SHRINK:
                cfg = _shrink_cfg(c)
                per_d = [
                    _time(
                        lambda p=probs[outs[0], d], m=metas[d], cfg=cfg: lora_shrink(
                            p.x, [p.a], p.ranks, m, config=cfg
                        ),
                        rep,
                    )
                    for d in d_list
                ]
                print(
                    json.dumps(
                        {
                            "tune": "shrink",
                            "tokens": t,
                            "block_m": bm,
                            **cfg,
                            "us": [round(v * 1e3, 2) for v in per_d],
                        }
                    )
                )
                shr.append((sum(per_d), cfg))
            s_cfg = min(shr, key=lambda v: v[0])[1]
            total, exp_best = 0.0, {}
            for o in outs:
                exp = []
                for c in EXPAND:
                    cfg = _expand_cfg(c)
                    per_d = [
                        _time(
                            lambda p=probs[o, d], m=metas[d], cfg=cfg, sc=s_cfg: add_lora(
                                p.y,
                                p.x,
                                [p.a],
                                [p.b],
                                p.ranks,
                                p.scales,
                                m,
                                shrink_config=sc,
                                expand_config=cfg,
                            ),
                            rep,
                        )
                        for d in d_list
                    ]
                    print(
                        json.dumps(
                            {
                                "tune": "add_lora",
                                "tokens": t,
                                "out": o,
                                "block_m": bm,
                                **cfg,
                                "us": [round(v * 1e3, 2) for v in per_d],
                            }
                        )
                    )
                    exp.append((sum(per_d), cfg))
                exp_best[o] = min(exp, key=lambda v: v[0])
                total += exp_best[o][0]
            if best is None or total < best[0]:
                best = (total, bm, s_cfg, exp_best)
        total, bm, s_cfg, exp_best = best
        result["block_m"].append([t, bm])
        result["shrink"].append({"max_tokens": t, "dim": in_f, **s_cfg})
        for o, (_, cfg) in exp_best.items():
            result["expand"].append({"max_tokens": t, "dim": o, **cfg})
        print(
            json.dumps(
                {
                    "tune": "best",
                    "tokens": t,
                    "block_m": bm,
                    "total_us": total * 1e3,
                    "shrink": s_cfg,
                    "expand": {o: c for o, (_, c) in exp_best.items()},
                }
            )
        )
    return result


def _cases(tuned: dict, t: int, steps: list[tuple[int, int, str]]) -> list[tuple]:
    """(problem, meta, expand config) per step (adapters, K, mode) and ``out``, with tile
    heights and expand configs as the kernels pick them at run time."""
    in_f = SHAPES[0][0]
    cases = []
    for d, k, mode in steps:
        for o in (o for i, o in SHAPES if i == in_f):
            p = make_problem(t, in_f, o, adapters=d, k=k, seed=t + d + k)
            multi = k if mode == "plan" else 1
            meta = build_lora_meta(
                p.slots, p.weights, 64, block_m=block_m_in(tuned, t, multi), mode=mode
            )
            expand = _pick(tuned["expand"], t, o, work=meta.tile_k)
            cases.append((p, meta, launch_params(expand)))
    return cases


def _best_shrink(t: int, cases: list[tuple], own: dict, rep: int, tag: dict) -> dict | None:
    """The shrink config of ``SHRINK`` with the least total time over ``cases`` (whole
    ``add_lora`` calls), if it beats ``own`` by ``MIN_GAIN``; else None."""
    scores = []
    for c in SHRINK:
        cfg = _shrink_cfg(c)
        per = [
            _time(
                lambda p=p, m=m, e=e, cfg=cfg: add_lora(
                    p.y, p.x, [p.a], [p.b], p.ranks, p.scales, m,
                    shrink_config=cfg, expand_config=e,
                ),
                rep,
            )
            for p, m, e in cases
        ]  # fmt: skip
        print(json.dumps({**tag, "tokens": t, **cfg, "us": [round(v * 1e3, 2) for v in per]}))
        scores.append((sum(per), cfg))
    own_score = next((v for v, cfg in scores if cfg == own), None)
    best_score, best = min(scores, key=lambda v: v[0])
    print(json.dumps({**tag, "best": True, "tokens": t, "us": best_score * 1e3,
                      "own_us": None if own_score is None else own_score * 1e3,
                      "shrink": best}))  # fmt: skip
    # a gain within timing noise is no reason for a second entry
    if best != own and (own_score is None or best_score < (1 - MIN_GAIN) * own_score):
        return best
    return None


def tune_column(tuned: dict, quick: bool = False) -> list[dict]:
    """Shrink entries with ``mode: column`` (see the module docstring), against the entries
    of ``tuned`` without a mode, which those launches take otherwise."""
    in_f = SHAPES[0][0]
    rep = 5 if quick else 10
    plain = [e for e in tuned["shrink"] if "mode" not in e]
    entries = []
    for t in (t for t in TOKENS if t >= COLUMN_FROM_TOKENS):
        cases = _cases(tuned, t, [(d, k, "column") for d, k in COLUMN])
        work = min(m.grid_tiles * m.tile_k for _, m, _ in cases)
        own = launch_params(_pick(plain, t, in_f, work=work, mode="column"))
        best = _best_shrink(t, cases, own, rep, {"tune": "column"})
        if best is not None:
            entry = {"max_tokens": t, "dim": in_f, "mode": "column", "min_work": work}
            entries.append({**entry, **best})
    return entries


def tune_wide(tuned: dict, quick: bool = False) -> list[dict]:
    """Shrink entries with ``min_work`` for steps with many tiles (see the module docstring),
    against the block_m, shrink and expand entries of ``tuned``."""
    in_f = SHAPES[0][0]
    rep = 5 if quick else 10
    entries = []
    for t in (t for t in TOKENS if t >= 16):
        cases = _cases(tuned, t, WIDE)
        min_work = min(m.grid_tiles * m.tile_k for _, m, _ in cases)
        own = launch_params(_pick(tuned["shrink"], t, in_f))
        best = _best_shrink(t, cases, own, rep, {"tune": "wide", "min_work": min_work})
        if best is not None:
            entries.append({"max_tokens": t, "dim": in_f, "min_work": min_work, **best})
    return entries


def merged_shrink(
    shrink: list[dict], wide: list[dict] | None = None, column: list[dict] | None = None
) -> list[dict]:
    """``shrink`` with its wide entries (``min_work``, no ``mode``) replaced by ``wide`` and
    its column entries (``mode``) by ``column``; None keeps that kind as it is."""

    def is_wide(e: dict) -> bool:
        return "min_work" in e and "mode" not in e

    kept = [
        e
        for e in shrink
        if not (wide is not None and is_wide(e)) and not (column is not None and "mode" in e)
    ]
    return kept + (wide or []) + (column or [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    only = ap.add_mutually_exclusive_group()  # both at once would redo nothing
    only.add_argument("--wide-only", action="store_true", help="redo only the min_work entries")
    only.add_argument("--column-only", action="store_true", help="redo only the column entries")
    args = ap.parse_args()
    path = args.out_dir / f"{gpu_config_name('cuda')}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if (args.wide_only or args.column_only) and not old:
        raise SystemExit(f"--wide-only and --column-only need a tuned {path}")
    if args.wide_only or args.column_only:
        cfg = old
    else:  # keep what other sweeps wrote (the fused GEMM's entries and limits, and the
        # expand's min_work entries for tiles of several adapters, from bench/kernels_sweep.py)
        cfg = {**old, **tune(args.quick)}
        cfg["expand"] += [e for e in old.get("expand", []) if "min_work" in e]
    day = f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}"
    if not args.column_only:
        cfg["shrink"] = merged_shrink(cfg["shrink"], wide=tune_wide(cfg, args.quick))
        cfg["wide_notes"] = (
            f"min_work shrink entries: python -m kernels.tune, {day}; add_lora graph replays "
            "on 64 distinct adapters (K=1) and top-2 plans over 8 (K=2)"
        )
    if not args.wide_only:  # after the wide ones, which column launches take without these
        cfg["shrink"] = merged_shrink(cfg["shrink"], column=tune_column(cfg, args.quick))
        cfg["column_notes"] = (
            f"mode column shrink entries: python -m kernels.tune --column-only, {day}; "
            "add_lora graph replays on column-mode top-2 steps over 64 adapters"
        )
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    print(json.dumps({"tune": "written", "path": str(path)}))


if __name__ == "__main__":
    main()
