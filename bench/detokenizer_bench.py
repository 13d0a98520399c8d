"""Host time of incremental detokenization per token, by completion length.

    python bench/detokenizer_bench.py [--lengths 128 512 2048 4096]

One stream pushed one token at a time through ``IncrementalDetokenizer`` with a stop string,
the dev models' byte-level BPE tokenizer (loraserve.devmodels) on a text with multi-byte
characters. Prints one JSON line per length; never asserts on time. The serving loop pays
this per token of every stream, on the host, each step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor_svc.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from loraserve.devmodels import build_tokenizer  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. Größe, naïve café — 日本語 🙂. "


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 4096])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tok = build_tokenizer(Path(d))
    ids = tok(TEXT * (1 + max(args.lengths) // 20))["input_ids"]
    for n in args.lengths:
        best = float("inf")
        for _ in range(3):
            detok = IncrementalDetokenizer(tok, ["\n\nEND"])
            t = time.perf_counter()
            for i in ids[:n]:
                detok.push([i])
            best = min(best, time.perf_counter() - t)
        print(
            json.dumps(
                {"bench": "detokenizer", "tokens": n, "us_per_token": round(best / n * 1e6, 1)}
            )
        )


if __name__ == "__main__":
    main()
