"""Launch configurations of the LoRA kernels, tuned per GPU and stored as JSON.

``kernels/configs/<GPU name with spaces as underscores>.json`` (e.g.
``NVIDIA_H100_80GB_HBM3.json``, written by ``python -m kernels.tune``) holds, per op, a list
of entries keyed by a token-count bucket (``max_tokens``) and a size (``dim``: ``in`` for the
shrink, ``out`` for the expand and the fused GEMM, whose entries also carry ``in``).
``default.json`` serves GPUs without a file and the CPU interpreter. Lookup: the smallest
bucket with ``max_tokens >= T`` (else the largest), then the entry whose ``dim`` (and ``in``,
where given) is nearest in log scale.

Shrink entries may also carry ``min_work``: the entry applies to launches with at least that
many (tile, adapter, slice) units of work (``grid_tiles * tile_k * slices``), and the one with
the largest ``min_work`` that fits wins. The token count alone does not say how much work a
decode step holds: 64 tokens on one adapter are one tile, on 64 adapters 64 tiles. Split-K
spreads few tiles over the GPU, but every split is a partial sum that the expand reads back,
so many tiles want fewer splits (measured: docs/benchmarks.md, seventh pass). Expand entries
may carry ``min_work`` too, counted there in adapters per tile (the metadata's ``tile_k``): a
plan-mode tile of K adapters loads K B matrices per program (stacked, for one dot).
Shrink entries with ``mode`` ("plan" or "column", the metadata's mode) apply only to
launches of that mode (and of their ``min_work``), and win over entries without it:
``min_work`` alone cannot tell a column-mode launch from a plan-mode one of as much work (a
column tile holds one adapter, a plan tile of two counts twice per program). The H100's
column entries (``python -m kernels.tune --column-only``) took 4-6% off a column-mode top-2
step over 64 adapters at 1,024 and 4,096 tokens (docs/benchmarks.md, nineteenth pass).
Top-level keys beside the op lists set GPU-wide choices: ``block_m`` tables,
``fused_max_tokens``, ``beside_triton_gemm_tokens``, ``expand_y_chunk_bytes``.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


def gpu_config_name(device: torch.device | str | None = None) -> str:
    """File stem of a device's config: the CUDA device name with spaces as underscores."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "default"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


@functools.cache
def load_config(name: str) -> dict:
    """The parsed JSON for ``name`` (a GPU config stem), falling back to ``default.json``."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        path = CONFIG_DIR / "default.json"
    return json.loads(path.read_text())


def _pick(
    entries: list[dict],
    num_tokens: int,
    dim: int,
    in_dim: int | None = None,
    work: int = 0,
    mode: str | None = None,
) -> dict:
    buckets = sorted({e["max_tokens"] for e in entries})
    bucket = next((b for b in buckets if b >= num_tokens), buckets[-1])
    same = [
        e
        for e in entries
        if e["max_tokens"] == bucket
        and e.get("min_work", 0) <= work
        and e.get("mode", mode) == mode
    ]

    def distance(e: dict) -> float:
        d = abs(math.log(e.get("dim", dim) / dim)) if dim else 0.0
        if in_dim and "in" in e:
            d += abs(math.log(e["in"] / in_dim))
        return d

    # nearest size first; among entries of that size, one for the mode, then the most work
    # that fits
    return min(same, key=lambda e: (distance(e), "mode" not in e, -e.get("min_work", 0)))


LOOKUP_KEYS = ("max_tokens", "dim", "in", "min_work", "mode")


def launch_params(entry: dict) -> dict:
    """An entry's launch parameters, without the keys it is looked up by."""
    return {k: v for k, v in entry.items() if k not in LOOKUP_KEYS}


@functools.cache
def _lookup(
    name: str,
    op: str,
    num_tokens: int,
    dim: int,
    in_dim: int | None,
    work: int = 0,
    mode: str | None = None,
) -> dict:
    return launch_params(_pick(load_config(name)[op], num_tokens, dim, in_dim, work, mode))


def kernel_config(
    op: str,
    num_tokens: int,
    dim: int,
    device: torch.device | str,
    in_dim: int | None = None,
    work: int = 0,
    mode: str | None = None,
) -> dict:
    """Launch parameters of ``op`` ("shrink", "expand" or "fused") for T tokens and size
    ``dim`` (and, for the fused GEMM, whose entries carry both, ``in_dim``); ``work`` picks
    among entries with ``min_work``: (tile, adapter, slice) units for the shrink, adapters
    per tile for the expand; ``mode`` (the metadata's) among entries with ``mode``."""
    return _lookup(gpu_config_name(device), op, num_tokens, dim, in_dim, work, mode)


def fused_max_tokens(device: torch.device | str, lora: bool) -> int:
    """Most tokens for which the engine runs :func:`kernels.fused_linear_lora` instead of
    cuBLAS plus the separate delta (``lora``) or cuBLAS alone (no adapters); 0 = never.
    Measured per GPU (docs/benchmarks.md); GPUs without a file keep cuBLAS."""
    limits = load_config(gpu_config_name(device)).get("fused_max_tokens", {})
    return int(limits.get("lora" if lora else "base", 0))


def expand_chunk_bytes(device: torch.device | str) -> int:
    """Most bytes of y that one launch of a column-mode expand pass covers before the next
    pass covers the same columns (``expand_y_chunk_bytes`` in the GPU's config; 0, the
    default, runs each pass over all of y; see :func:`kernels.lora_expand_op.chunk_blocks`).
    Two passes run as a wavefront over chunks of half of it (``pass_launches``)."""
    return int(load_config(gpu_config_name(device)).get("expand_y_chunk_bytes", 0))


def beside_triton_gemm_tokens(device: torch.device | str) -> list[tuple[int, int, int | None]]:
    """Where :func:`kernels.linear_beside_lora` runs the base GEMM as our skinny Triton GEMM
    instead of cuBLAS while the delta's kernels run beside it: ``[(lo, hi, max_out), ...]``,
    token counts lo..hi (inclusive) for projections of at most ``max_out`` output features
    (None: any width). From ``beside_triton_gemm_tokens`` in the GPU's config, entries
    ``[lo, hi]`` or ``[lo, hi, max_out]``; none without a config. Measured per GPU:
    docs/benchmarks.md, ninth and twelfth passes."""
    return beside_rules(load_config(gpu_config_name(device)))


def beside_rules(cfg: dict) -> list[tuple[int, int, int | None]]:
    """``beside_triton_gemm_tokens`` of a parsed config, as (lo, hi, max_out) rules."""
    entries = cfg.get("beside_triton_gemm_tokens", [])
    return [(int(e[0]), int(e[1]), int(e[2]) if len(e) > 2 else None) for e in entries]


def triton_gemm_beside(rules: list[tuple[int, int, int | None]], tokens: int, out: int) -> bool:
    """Whether some rule covers a projection of ``out`` features at ``tokens`` tokens."""
    return any(
        lo <= tokens <= hi and (max_out is None or out <= max_out) for lo, hi, max_out in rules
    )


def block_m_for(num_tokens: int, device: torch.device | str, adapters_per_tile: int = 1) -> int:
    """Tokens per tile (the metadata's block_m) for a step of ``num_tokens`` tokens, for tiles
    of ``adapters_per_tile`` adapters (plan mode with K > 1 may take other heights)."""
    return block_m_in(load_config(gpu_config_name(device)), num_tokens, adapters_per_tile)


def block_m_in(cfg: dict, num_tokens: int, adapters_per_tile: int = 1) -> int:
    """``block_m_for`` from a parsed config (the tuner's, before it is written). Tiles of
    several adapters use the ``block_m_multi`` table where the config has one: 32-row K=2
    tiles were 3-9% slower than 16-row ones at 1,024-4,096 tokens on the H100, their expand
    spilling registers (docs/benchmarks.md, fourteenth pass)."""
    table = cfg["block_m"]
    if adapters_per_tile > 1:
        table = cfg.get("block_m_multi", table)
    for max_tokens, bm in table:
        if num_tokens <= max_tokens:
            return int(bm)
    return int(table[-1][1])


def token_buckets(device: torch.device | str) -> list[int]:
    """Token counts at which the launch parameters change (each a different compiled kernel):
    the shrink's, the expand's and the fused GEMM's entries (whose BLOCK_M, where an entry
    gives none, is the token count's power of two: the H100's entries end at 16, 32 and 64)
    and the block_m tables."""
    cfg = load_config(gpu_config_name(device))
    found = {e["max_tokens"] for op in ("shrink", "expand", "fused") for e in cfg.get(op, [])}
    tables = cfg["block_m"] + cfg.get("block_m_multi", [])
    return sorted(found | {int(t) for t, _ in tables})
