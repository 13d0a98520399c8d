"""Sweep the kernels' launch parameters on this GPU and write kernels/configs/<GPU>.json.

    python -m kernels.tune [--out-dir kernels/configs] [--quick]

For every token count of the benchmark (1 ... 4096) and every tile height ``block_m``, the
shrink configs are timed (Llama-2-7B in=4096, rank 16, adapters {1, 8, 64}, K=1; the score is
the sum over adapter counts), then the expand configs for each ``out`` using the best shrink's
partial sums; the ``block_m`` with the smallest shrink + expand total wins. Times are medians
of triton.testing.do_bench with the L2 flushed. One JSON line per measurement goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kernels import build_lora_meta, lora_expand, lora_shrink
from kernels._bench import ADAPTERS, SHAPES, TOKENS, bench_ms, make_problem
from kernels.config import CONFIG_DIR, gpu_config_name

SHRINK = [  # (BLOCK_K, SPLIT_K, num_warps, num_stages)
    (256, 16, 4, 1),
    (128, 32, 4, 1),
    (128, 16, 4, 2),
    (256, 8, 4, 2),
    (512, 8, 4, 1),
    (64, 32, 4, 2),
    (128, 8, 4, 3),
    (128, 4, 4, 3),
    (128, 2, 4, 3),
    (128, 1, 4, 4),
    (64, 2, 4, 4),
    (256, 2, 8, 3),
]
EXPAND = [  # (BLOCK_N, num_warps, num_stages)
    (64, 4, 1),
    (128, 4, 1),
    (128, 4, 2),
    (256, 4, 1),
    (256, 8, 1),
    (128, 8, 1),
    (512, 8, 1),
]


def block_ms_for(tokens: int) -> list[int]:
    return [bm for bm in (16, 32, 64, 128) if bm <= max(16, tokens) and (tokens < 1024 or bm >= 32)]


def _shrink_cfg(c: tuple) -> dict:
    return {"BLOCK_K": c[0], "SPLIT_K": c[1], "num_warps": c[2], "num_stages": c[3]}


def _expand_cfg(c: tuple) -> dict:
    return {"BLOCK_N": c[0], "num_warps": c[1], "num_stages": c[2]}


def tune(quick: bool = False) -> dict:
    in_f = SHAPES[0][0]
    outs = [o for i, o in SHAPES if i == in_f]
    rep = 5 if quick else 10
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "block_m": [],
        "shrink": [],
        "expand": [],
        "notes": "written by python -m kernels.tune, "
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}",
    }
    for t in TOKENS:
        d_list = sorted({min(d, t) for d in ADAPTERS})
        probs = {(o, d): make_problem(t, in_f, o, adapters=d, seed=d) for o in outs for d in d_list}
        best_total = None
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
                ms = sum(
                    bench_ms(
                        lambda p=probs[outs[0], d], m=metas[d], cfg=cfg: lora_shrink(
                            p.x, [p.a], p.ranks, m, config=cfg
                        ),
                        warmup=5,
                        rep=rep,
                    )
                    for d in d_list
                )
                print(json.dumps({"tune": "shrink", "tokens": t, "block_m": bm, **cfg, "ms": ms}))
                shr.append((ms, cfg))
            s_ms, s_cfg = min(shr, key=lambda v: v[0])
            total, exp_best = s_ms, {}
            for o in outs:
                hs = {
                    d: lora_shrink(
                        probs[o, d].x, [probs[o, d].a], probs[o, d].ranks, metas[d], config=s_cfg
                    )
                    for d in d_list
                }
                exp = []
                for c in EXPAND:
                    cfg = _expand_cfg(c)
                    ms = sum(
                        bench_ms(
                            lambda p=probs[o, d], m=metas[d], h=hs[d], cfg=cfg: lora_expand(
                                p.y, h, [p.b], p.ranks, p.scales, m, config=cfg
                            ),
                            warmup=5,
                            rep=rep,
                        )
                        for d in d_list
                    )
                    print(
                        json.dumps(
                            {
                                "tune": "expand",
                                "tokens": t,
                                "out": o,
                                "block_m": bm,
                                **cfg,
                                "ms": ms,
                            }
                        )
                    )
                    exp.append((ms, cfg))
                exp_best[o] = min(exp, key=lambda v: v[0])
                total += exp_best[o][0]
            if best_total is None or total < best_total[0]:
                best_total = (total, bm, s_cfg, exp_best)
        _, bm, s_cfg, exp_best = best_total
        result["block_m"].append([t, bm])
        result["shrink"].append({"max_tokens": t, "dim": in_f, **s_cfg})
        for o, (_, cfg) in exp_best.items():
            result["expand"].append({"max_tokens": t, "dim": o, **cfg})
        print(json.dumps({"tune": "best", "tokens": t, "block_m": bm, "total_ms": best_total[0]}))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=CONFIG_DIR)
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    args = ap.parse_args()
    cfg = tune(args.quick)
    path = args.out_dir / f"{gpu_config_name('cuda')}.json"
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    print(json.dumps({"tune": "written", "path": str(path)}))


if __name__ == "__main__":
    main()
