"""Paged attention on the GPU: decode by batch and context length; prefill by chunk layout.

One Llama-2-7B layer's shape (32 query and KV heads, head_dim 128, bf16, blocks of 16 tokens),
every sequence's blocks scattered over the cache (a random permutation, as the block
manager's free list leaves them after a while). Prints one JSON line per (batch, context):
the kernel's median time in a CUDA graph (L2 flushed) and the bytes it must read (every
context token's K and V, the queries and the output) over that time, with the split count
``decode_splits`` picks; ``--sweep`` adds every split count, tile and warp count. Never asserts
on time.

``--prefill [LAYOUT ...]`` runs one layer's prefill attention instead, for chunk layouts of one
step (fresh prompts of equal and mixed lengths, chunks with long histories): SDPA calls
against the paged prefill kernel (and its block sizes, warps and stages with ``--sweep``),
time and TFLOP/s of the causal attention's matmuls.

    python bench/attention_bench.py [--batches 1 8 32 64] [--contexts 192 1024 4096] [--sweep]
    python bench/attention_bench.py --prefill [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor_svc.model.context import PrefillChunk, StepContext  # noqa: E402
from executor_svc.model.layers.attention import PagedAttention  # noqa: E402
from executor_svc.model.layers.paged_attention import (  # noqa: E402
    decode_splits,
    paged_decode_triton,
)
from executor_svc.model.layers.paged_prefill import (  # noqa: E402
    build_prefill_meta,
    paged_prefill_triton,
)
from kernels._bench import bench_ms, graph_ms  # noqa: E402

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


PREFILL_LAYOUTS = {  # (length, history) of each prefill chunk of one step
    "16x128": [(128, 0)] * 16,
    "16_mixed": [(64 + 8 * i, 0) for i in range(16)],
    "1x2048": [(2048, 0)],
    "4x512_after_1536": [(512, 1536)] * 4,
    "2048_after_6144": [(2048, 6144)],
}


def prefill_case(layout: str, kv_heads: int, gen: torch.Generator, sweep: bool) -> list[dict]:
    """One layer's prefill attention for ``layout``: by SDPA (one call per run of equal fresh
    prompts and per chunk with history, over gathered rows: the CPU path) and by the paged
    prefill kernel; eager launches, as prefill steps run (host time included when it is the
    longer)."""
    chunks_lh = PREFILL_LAYOUTS[layout]
    dev, dt = "cuda", torch.bfloat16
    need = [-(-(n + h) // BLOCK) for n, h in chunks_lh]
    num_blocks = 1 + sum(need)
    free = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    k_cache = torch.randn(num_blocks * BLOCK, kv_heads, HEAD_DIM, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    t = sum(n for n, _ in chunks_lh)
    q = torch.randn(t, HEADS, HEAD_DIM, device=dev, dtype=dt)
    k = torch.randn(t, kv_heads, HEAD_DIM, device=dev, dtype=dt)
    v = torch.randn_like(k)
    chunks, prefills, slot_rows, start = [], [], [], 0
    for (n, h), nb in zip(chunks_lh, need, strict=True):
        table = [free.pop() for _ in range(nb)]
        pos = torch.arange(n + h)
        rows = (torch.tensor(table)[pos // BLOCK] * BLOCK + pos % BLOCK).to(dev)
        c = PrefillChunk(start=start, length=n)
        if h:
            c.kv_rows = rows
            c.mask = (pos[None, :] <= (torch.arange(n) + h)[:, None]).to(dev)
        chunks.append((start, n, h, table))
        prefills.append(c)
        slot_rows.append(rows[h:])
        start += n
    base = dict(
        positions=torch.zeros(t, dtype=torch.long, device=dev),
        slot_mapping=torch.cat(slot_rows),
        prefills=prefills,
        block_size=BLOCK,
    )
    attn = PagedAttention(HEADS, kv_heads, HEAD_DIM)
    flops = sum(4 * HEADS * HEAD_DIM * n * (h + (n + 1) / 2) for n, h in chunks_lh)
    # the layer both ways (cache writes and host time included), then the kernels alone
    configs = [("sdpa", {}, None), ("paged_prefill", {}, None), ("paged_kernel", {}, None)]
    one_run = all(h == 0 and n == chunks_lh[0][0] for n, h in chunks_lh)
    if one_run:  # one SDPA call does every prompt: the engine's choice for such steps
        configs.append(("sdpa_kernel", {}, None))
    if sweep:
        configs += [
            ("paged_prefill", {"block_n": bn, "num_warps": w, "num_stages": st}, bm)
            for bm in (64, 128)
            for bn in (32, 64, 128)
            for w in (4, 8)
            for st in (1, 2, 3)
        ]
    rows_out = []
    for path, kw, bm in configs:
        if path == "sdpa":
            ctx = StepContext(**base)
            fn = lambda ctx=ctx: attn(q, k, v, (k_cache, v_cache), ctx)  # noqa: E731
        elif path == "sdpa_kernel":
            n = len(chunks_lh)
            qs, ks, vs = (x.view(n, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            fn = lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(  # noqa: E731
                qs, ks, vs, is_causal=True, scale=HEAD_DIM**-0.5, enable_gqa=True
            )
        else:
            meta = build_prefill_meta(chunks, dev, **({"block_m": bm} if bm else {}))
            ctx = StepContext(**base, prefill_meta=meta)
            out = torch.empty_like(q)
            if kw or path == "paged_kernel":  # the kernel alone
                fn = lambda meta=meta, out=out, kw=kw: paged_prefill_triton(  # noqa: E731
                    q, k_cache, v_cache, meta, HEAD_DIM**-0.5, BLOCK, out, **kw
                )
            else:  # as the layer runs it (with the cache writes the SDPA row makes too)
                fn = lambda ctx=ctx: attn(q, k, v, (k_cache, v_cache), ctx)  # noqa: E731
        try:
            ms = bench_ms(fn)
        except Exception as exc:  # a config that does not fit (shared memory): say so, go on
            rows_out.append({"bench": "paged_prefill", "layout": layout, "error": repr(exc)[:200]})
            continue
        rows_out.append(
            {
                "bench": "prefill_attention",
                "layout": layout,
                "kv_heads": kv_heads,
                "path": path,
                "config": {**kw, **({"block_m": bm} if bm else {})},
                "us": round(ms * 1e3, 2),
                "tflops": round(flops / ms / 1e9, 1),
            }
        )
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[192, 1024, 4096])
    ap.add_argument("--kv-heads", type=int, default=32, help="32: Llama-2-7B; 8: GQA (Mistral)")
    ap.add_argument(
        "--prefill",
        nargs="*",
        choices=sorted(PREFILL_LAYOUTS),
        help="prefill layouts to run instead of the decode cases (none named: all)",
    )
    ap.add_argument("--sweep", action="store_true", help="also every split, tile and warps")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    print(json.dumps({"device": torch.cuda.get_device_name()}), flush=True)
    if args.prefill is not None:
        for layout in args.prefill or PREFILL_LAYOUTS:
            for row in prefill_case(layout, args.kv_heads, gen, args.sweep):
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        return
    for b in args.batches:
        for c in args.contexts:
            for row in decode_case(b, c, args.kv_heads, gen, args.sweep):
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
