"""bench/kernel_registers.py: the kernels compiled for the H100 (sm_90) on this host, as its
launches specialise them; a guard on the registers the tuned decode configs rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_kernels_fit_their_programs_per_sm_without_spilling() -> None:
    """64 tokens on 64 adapters: the expand's 512 programs of 8 warps run in one wave only
    at 4 programs an SM, i.e. at most 64 registers a thread (70 took it to 13.2 -> 15.0 us
    on the H100, docs/benchmarks.md, fifteenth pass). Neither kernel may spill."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_registers.py"), "--cases", "4096:64:64:1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    kernels = {line["kernel"]: line for line in lines}
    assert set(kernels) == {"_lora_shrink_kernel", "_lora_expand_kernel"}, lines
    expand = kernels["_lora_expand_kernel"]
    assert (expand["TILE_K"], expand["num_warps"], expand["grid"]) == (1, 8, [64, 8, 1])
    assert expand["registers"] <= 64, expand
    for line in lines:
        assert line["local"] == 0 and line["stack"] == 0, line


def test_the_shrink_in_the_fused_loop_costs_the_gemm_no_registers_at_one_token() -> None:
    """qkv at one token, one adapter: the fused GEMM with the shrink in its main loop needs no
    more registers than with the shrink apart (96 each, compiled for sm_90). The loads of
    adapters shrunk after the loop, at the main loop's BLOCK_K, took it to 146 registers
    (docs/benchmarks.md, twenty-first pass); nothing may spill."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_registers.py"), "--cases",
         "--fused", "4096:4096x3:1:1:1"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    gemm = {
        line["placement"]: line for line in lines if line["kernel"] == "_fused_linear_lora_kernel"
    }
    assert set(gemm) == {"loop", "apart"}, lines
    assert gemm["loop"]["registers"] <= gemm["apart"]["registers"], gemm
    assert [line["kernel"] for line in lines].count("_lora_shrink_kernel") == 1, lines
    for line in lines:
        assert line["local"] == 0 and line["stack"] == 0, line
