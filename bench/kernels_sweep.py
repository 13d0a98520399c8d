"""Launch-config sweep of add_lora for chosen cases, scored as the engine pays: the marginal
cost of the delta after its base projection, both in one CUDA graph.

    python bench/kernels_sweep.py [--cases OUT:T:D:K ...] [--modes plan column]

For each case (bf16, in=4096, rank 16, 64 slots; the problems of bench/kernels_bench.py) and
metadata mode: every shrink config with the tuned expand config, then every expand config
with the best shrink config (coordinate descent). One JSON line per timing, then one per case
with the tuned config's marginal and the best found. Never asserts on time. Where a case
class prefers other configs than kernels/configs/ holds, the table gains a key for it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import add_lora, build_lora_meta  # noqa: E402
from kernels._bench import graph_ms, make_problem  # noqa: E402
from kernels.config import kernel_config  # noqa: E402

SHRINK = [  # (BLOCK_K, SPLIT_K, num_warps, num_stages)
    (128, 32, 4, 1),
    (64, 64, 4, 1),
    (128, 32, 2, 1),
    (256, 16, 4, 1),
    (256, 16, 8, 2),
    (128, 16, 4, 2),
    (256, 8, 4, 2),
    (512, 8, 8, 2),
    (128, 8, 4, 3),
    (256, 4, 4, 3),
    (128, 4, 4, 3),
    (128, 2, 4, 3),
]
EXPAND = [  # (BLOCK_N, num_warps, num_stages)
    (64, 4, 1),
    (128, 4, 1),
    (128, 8, 1),
    (256, 4, 1),
    (256, 8, 1),
    (256, 8, 2),
    (512, 8, 1),
    (1024, 8, 1),
]
CASES = [
    "4096:64:64:1",
    "11008:64:64:1",
    "4096:256:64:1",
    "4096:64:8:1",
    "4096:64:8:2",
    "4096:256:8:1",
    "4096:256:8:2",
    "4096:1024:8:1",
    "4096:1024:8:2",
    "11008:16:8:1",
    "11008:16:8:2",
    "11008:1024:8:1",
    "11008:1024:8:2",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=CASES, help="OUT:T:D:K")
    ap.add_argument("--modes", nargs="+", default=["plan", "column"])
    ap.add_argument("--rep", type=int, default=20)
    args = ap.parse_args()
    in_f = 4096
    weights: dict[int, torch.Tensor] = {}
    for case in args.cases:
        out_f, t, d, k = (int(v) for v in case.split(":"))
        w = weights.setdefault(out_f, torch.randn(out_f, in_f, device="cuda").to(torch.bfloat16))
        p = make_problem(t, in_f, out_f, adapters=d, k=k, seed=t + d + k)
        base = lambda p=p, w=w: torch.mm(p.x, w.t(), out=p.y)  # noqa: E731
        base_ms = graph_ms(base, rep=args.rep)
        for mode in args.modes if k > 1 else ["plan"]:
            meta = build_lora_meta(p.slots, p.weights, 64, mode=mode)

            def marginal(s_cfg, e_cfg, p=p, meta=meta, base=base, base_ms=base_ms):
                def step():
                    base()
                    add_lora(
                        p.y, p.x, [p.a], [p.b], p.ranks, p.scales, meta,
                        shrink_config=s_cfg, expand_config=e_cfg,
                    )  # fmt: skip

                try:
                    return graph_ms(step, rep=args.rep) - base_ms
                except Exception as e:  # a config that does not fit (shared memory, registers)
                    print(json.dumps({"error": repr(e)[:160]}))
                    return float("inf")

            # the tuned configs as add_lora picks them (the shrink's by work, too)
            tuned = marginal(None, None)
            tuned_e = kernel_config("expand", t, out_f, "cuda", work=meta.tile_k)
            shr = []
            for bk, sk, nw, ns in SHRINK:
                cfg = {"BLOCK_K": bk, "SPLIT_K": sk, "num_warps": nw, "num_stages": ns}
                shr.append((marginal(cfg, tuned_e), cfg))
                print(
                    json.dumps({"case": case, "mode": mode, "shrink": cfg, "us": shr[-1][0] * 1e3})
                )
            best_s = min(shr, key=lambda v: v[0])[1]
            exp = []
            for bn, nw, ns in EXPAND:
                cfg = {"BLOCK_N": bn, "num_warps": nw, "num_stages": ns}
                exp.append((marginal(best_s, cfg), cfg))
                print(
                    json.dumps({"case": case, "mode": mode, "expand": cfg, "us": exp[-1][0] * 1e3})
                )
            best_ms, best_e = min(exp, key=lambda v: v[0])
            print(
                json.dumps(
                    {
                        "case": case,
                        "mode": mode,
                        "tiles": meta.num_tiles,
                        "base_us": round(base_ms * 1e3, 2),
                        "tuned_us": round(tuned * 1e3, 2),
                        "best_us": round(best_ms * 1e3, 2),
                        "best_shrink": best_s,
                        "best_expand": best_e,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
