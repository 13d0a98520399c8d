"""Host cost of one decode step's sampling, by sampled rows.

    python bench/sampler_bench.py [--rows 1 8 64] [--vocab 32000]

Every row samples (temperature 0.7, top-k 50, top-p 0.9), without seeds and with one seed
per row. Prints one JSON line per case: the ATen ops the step's sampling issues (on CUDA each
is at least one kernel launch, ~5-10 us of host time; the seeded rows' Triton draw is one
launch more, not an ATen op) and the median wall time of the call,
on CUDA when present (the call ends in a host sync: it includes the GPU's time). Never
asserts on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor_svc.engine.sampler import sample  # noqa: E402
from executor_svc.engine.sequence import Sequence  # noqa: E402
from executor_svc.engine.types import SamplingOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, device=dev)
        for seeded in (False, True):
            seqs = []
            for i in range(rows):
                opts = SamplingOptions(
                    temperature=0.7, top_k=50, top_p=0.9, seed=i if seeded else None
                )
                seqs.append(Sequence(f"r{i}", [1], 1, opts, [], 100))
            sample(logits.clone(), seqs, [2])  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sample(logits.clone(), seqs, [2])
            ops = sum(
                1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None
            )
            times = []
            for _ in range(10):
                x = logits.clone()
                t = time.perf_counter()
                sample(x, seqs, [2])
                times.append(time.perf_counter() - t)
            print(json.dumps({"bench": "sampler", "device": str(dev), "rows": rows, "vocab": args.vocab,
                              "seeded": seeded, "aten_ops": ops,
                              "ms": round(statistics.median(times) * 1e3, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
