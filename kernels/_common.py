"""Shared launcher helpers: interpreter detection, block sizes, slice grouping."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

# Without a GPU the kernels run in Triton's interpreter (numpy). Triton reads this variable
# when a kernel is decorated, so it is set before any kernel module is imported; an explicit
# TRITON_INTERPRET=0/1 from the environment always wins.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Slices handled by one launch (fused qkv = 3); more slices launch in groups of this size.
SLICES_PER_LAUNCH = 3
# Stacked rank columns per rank chunk (K adapters x RANK_CHUNK): 64 keeps the shrink's fp32
# accumulator at BLOCK_M x 64 and covers rank 16 with K=4 in a single chunk.
MAX_RANK_COLS = 64


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (sm_90) and newer, never in the interpreter."""
    if INTERPRET or device.type != "cuda" or os.environ.get("LORASERVE_KERNELS_PDL") == "0":
        return False
    return _capability(device.index if device.index is not None else 0)[0] >= 9


def launch_options(device: torch.device, cfg: dict, dependent: bool = False) -> dict:
    """Triton launch keywords: warps, stages and, for a dependent kernel, PDL."""
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if dependent:
        opts["launch_pdl"] = True
    return opts


@functools.cache
def max_shared_memory(index: int) -> int:
    """Bytes of shared memory one program may use on CUDA device ``index``."""
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device``: the GPU's, unbounded off it
    (the interpreter keeps no shared memory), so that ``fit_stages`` cuts stages on the GPU
    only."""
    if device.type != "cuda" or INTERPRET:
        return 1 << 30
    return max_shared_memory(device.index or 0)


def fit_stages(num_stages: int, stage_bytes: int, limit: int) -> int:
    """The most software-pipeline stages, at most ``num_stages``, whose buffers fit in
    ``limit`` bytes, at least 1: a loop of s stages keeps s - 1 copies of the tiles it loads
    (``stage_bytes`` a copy) in shared memory. (The shrink compiled for sm_90 with 3 stages,
    a 16 x 128 tile of x and a 128 x 32 tile of A in bf16, takes 24 KB: 2 x 12 KB.)"""
    while num_stages > 1 and (num_stages - 1) * stage_bytes > limit:
        num_stages -= 1
    return num_stages


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rank_chunk(r_max: int, max_k: int) -> tuple[int, int]:
    """(KP, RANK_CHUNK): K padded to a power of two and the rank columns per chunk (>= 16)."""
    kp = next_pow2(max_k)
    return kp, min(max(16, next_pow2(r_max)), max(16, MAX_RANK_COLS // kp))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products; fp16/bf16 use the tensor cores natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def slice_groups(n: int) -> list[tuple[int, int]]:
    return [(g, min(n, g + SLICES_PER_LAUNCH)) for g in range(0, n, SLICES_PER_LAUNCH)]


def pad3(items: Sequence, fill) -> list:
    """Pad a group of <= 3 per-slice kernel arguments to exactly 3."""
    return list(items) + [fill] * (SLICES_PER_LAUNCH - len(items))


def check_meta(meta, device: torch.device, what: str) -> None:
    if meta.block_m < 16:
        raise ValueError(f"{what}: meta.block_m={meta.block_m}; the kernels need >= 16")
    if meta.row_tokens.device != device:
        raise ValueError(f"{what}: meta is on {meta.row_tokens.device}, tensors on {device}")


def check_operands(
    x: torch.Tensor, lora: Sequence[torch.Tensor], ranks: torch.Tensor, what: str
) -> None:
    if len(lora) == 0:
        raise ValueError(f"{what}: at least one slice is needed")
    if ranks.dim() != 2 or ranks.shape != (len(lora), lora[0].shape[0]):
        raise ValueError(
            f"{what}: ranks must be [n_slices={len(lora)}, slots="
            f"{lora[0].shape[0]}], got {tuple(ranks.shape)}"
        )
    for w in lora:
        if w.dtype != x.dtype or w.device != x.device or w.dim() != 3:
            raise ValueError(
                f"{what}: every weight must be a 3-d {x.dtype} tensor on "
                f"{x.device}, got {w.dtype} {tuple(w.shape)} on {w.device}"
            )
        if w.stride(-1) != 1:
            raise ValueError(f"{what}: weights must be contiguous in their last dimension")
