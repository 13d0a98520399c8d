"""Paged decode attention on the GPU: time and achieved bandwidth by batch and context length.

One Llama-2-7B layer's shape (32 query and KV heads, head_dim 128, bf16, blocks of 16 tokens),
every sequence's blocks scattered over the cache (a random permutation, as the block
manager's free list leaves them after a while). Prints one JSON line per (batch, context):
the kernel's median time in a CUDA graph (L2 flushed) and the bytes it must read (every
context token's K and V, the queries and the output) over that time, with the split count
``decode_splits`` picks; ``--sweep`` adds every split count, tile and warp count. Never asserts
on time.

    python bench/attention_bench.py [--batches 1 8 32 64] [--contexts 192 1024 4096] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor_svc.model.layers.paged_attention import (  # noqa: E402
    decode_splits,
    paged_decode_triton,
)
from kernels._bench import graph_ms  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 32, 128, 16


def decode_case(
    batch: int, context: int, kv_heads: int, gen: torch.Generator, sweep: bool
) -> list[dict]:
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = batch * blocks_per_seq + 1  # block 0: the engine's scratch block
    dev, dt = "cuda", torch.bfloat16
    k_cache = torch.randn(num_blocks * BLOCK, kv_heads, HEAD_DIM, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    tables = (1 + torch.randperm(num_blocks - 1, generator=gen)).view(batch, blocks_per_seq)
    tables = tables.to(dev, torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=dt)
    scale = HEAD_DIM**-0.5
    nbytes = 2 * (2 * batch * context * kv_heads * HEAD_DIM + 2 * batch * HEADS * HEAD_DIM)
    configs = [{}]  # decode_splits' choice, the kernel's defaults
    if sweep:
        configs += [
            {"splits": s, "tile": t, "num_warps": w}
            for s in (1, 2, 4, 8, 16)
            for t in (32, 64, 128)
            for w in (4, 8)
            if s * t <= max(t, context)
        ]
    rows = []
    for kw in configs:
        ms = graph_ms(
            lambda kw=kw: paged_decode_triton(q, k_cache, v_cache, tables, lens, scale, BLOCK, **kw)
        )
        rows.append(
            {
                "bench": "paged_decode",
                "batch": batch,
                "context": context,
                "kv_heads": kv_heads,
                "config": kw
                or {"splits": decode_splits(batch, kv_heads, blocks_per_seq * BLOCK), "auto": 1},
                "us": round(ms * 1e3, 2),
                "bytes": nbytes,
                "tb_s": round(nbytes / ms / 1e9, 3),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[192, 1024, 4096])
    ap.add_argument("--kv-heads", type=int, default=32, help="32: Llama-2-7B; 8: GQA (Mistral)")
    ap.add_argument("--sweep", action="store_true", help="also every split, tile and warps")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    print(json.dumps({"device": torch.cuda.get_device_name()}), flush=True)
    for b in args.batches:
        for c in args.contexts:
            for row in decode_case(b, c, args.kv_heads, gen, args.sweep):
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
