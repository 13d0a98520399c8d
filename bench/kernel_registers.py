"""Registers, spills and shared memory of the LoRA kernels as a GPU would launch them,
compiled on any host, no GPU needed.

    python bench/kernel_registers.py [--gpu NVIDIA_H100_80GB_HBM3] [--arch 90]
        [--cases OUT:T:D:K ...] [--mode plan|column]
        [--fused IN:OUTxSLICES:T:D:K ...]

For each case (bf16, in=4096, rank 16, 64 slots; the problems of bench/kernels_bench.py) it
runs ``add_lora``'s real launch path on CPU tensors with the kernel launcher swapped for a
recorder, under that GPU's tuned configs (``kernels/configs/<gpu>.json``) and with
programmatic dependent launch on (as on Hopper). Each recorded launch is then bound and
specialised by Triton's own binder (16-byte alignment of each pointer, ints that are 1 or
multiples of 16: what a launch on the GPU compiles), compiled for ``sm_<arch>`` and read
with ``cuobjdump -res-usage``. One JSON line per launch. ``--fused`` does the same for
``fused_linear_lora`` (e.g. ``4096:4096x3:1:1:1``, qkv at one token with one adapter), with
the shrink in the GEMM's main loop and apart (the line's ``placement``).

Why: register counts taken from compiles without the alignment specialisation were wrong by
up to 3x (docs/benchmarks.md, fifteenth pass), and they decide how many programs an SM holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU, before any kernel is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.config as kernel_configs  # noqa: E402
from kernels import (  # noqa: E402
    add_lora,
    build_lora_meta,
    fused_linear_lora_op,
    lora_expand_op,
    lora_shrink_op,
)
from kernels._bench import make_problem  # noqa: E402
from kernels._launch import Launcher  # noqa: E402

CASES = ["4096:1:1:1", "4096:64:64:1", "11008:256:8:2", "4096:4096:8:2"]
SHOWN = ("TILE_K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "NUM_SPLITS", "SPLIT_GROUP", "N_SLICES",
         "LOOP_SLOTS")  # fmt: skip
# Shared memory a program may use, by compute capability (the shrink and the fused GEMM fit
# their stages to it)
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def record_launches(case: str, mode: str | None) -> list[tuple]:
    """(kernel, grid, args, constexprs, options) of every launch add_lora makes for a case."""
    out_f, t, d, k = (int(v) for v in case.split(":"))
    p = make_problem(t, 4096, out_f, adapters=d, k=k, seed=t + d + k, device="cpu")
    kw = {"mode": mode} if mode and k > 1 else {}
    meta = build_lora_meta(p.slots, p.weights, 64, torch.device("cpu"), **kw)
    return _recorded(lambda: add_lora(p.y, p.x, [p.a], [p.b], p.ranks, p.scales, meta))


def _recorded(call) -> list[tuple]:
    """(kernel, grid, args, constexprs, options) of every launch ``call()`` makes."""
    launches: list[tuple] = []
    recorder = lambda self, grid, args, cx, opts: launches.append((self.fn, grid, args, cx, opts))  # noqa: E731
    saved = Launcher.__call__
    Launcher.__call__ = recorder
    try:
        call()
    finally:
        Launcher.__call__ = saved
    return launches


def record_fused_launches(case: str, in_loop: bool) -> list[tuple]:
    """The launches of fused_linear_lora for IN:OUTxSLICES:T:D:K, the shrink in the GEMM's
    main loop or apart (bf16, rank 16, the problems of bench/fused_linear_bench.py)."""
    in_f, outs, t, d, k = case.split(":")
    out_f, _, slices = outs.partition("x")
    in_f, out_f, t, d, k = int(in_f), int(out_f), int(t), int(d), int(k)
    ps = [make_problem(t, in_f, out_f, adapters=d, k=k, seed=1, device="cpu")
          for _ in range(int(slices or 1))]  # fmt: skip
    p = ps[0]
    w = torch.zeros(out_f * len(ps), in_f, dtype=p.x.dtype)
    meta = build_lora_meta(p.slots, p.weights, p.a.shape[0], torch.device("cpu"))
    ranks = torch.cat([q.ranks for q in ps])
    scales = torch.cat([q.scales for q in ps])
    args = (p.x, w, None, [q.a for q in ps], [q.b for q in ps], ranks, scales, meta)
    config = {**kernel_configs.kernel_config("fused", t, w.shape[0], "cpu", in_f),
              "IN_LOOP": int(in_loop)}  # fmt: skip
    return _recorded(lambda: fused_linear_lora_op.fused_linear_lora(*args, config=config))


def compile_usage(fn, args: tuple, constexprs: dict, options: dict, target: GPUTarget) -> dict:
    """Bind and specialise a launch as Triton would on the GPU, compile it, read its usage.

    (``create_function_from_signature`` and ``JITFunction._pack_args`` are the internals
    ``JITFunction.run`` uses, in triton 3.6 and 3.7; a Triton that moves them breaks this tool
    and its test loudly, not the counts quietly.)"""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**constexprs, **options}
    bound, specialization, opts = binder(*args, **kwargs)
    opts, signature, cx, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    compiled = triton.compile(
        ASTSource(fn, signature, cx, attrs), target=target, options=opts.__dict__
    )
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = _USAGE.search(usage)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{usage}")
    regs, stack, _, local = (int(v) for v in m.groups())
    # Triton's shared memory is dynamic: its size is in the kernel's metadata, not the cubin
    return {"registers": regs, "stack": stack, "local": local, "shared": compiled.metadata.shared}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="NVIDIA_H100_80GB_HBM3", help="config stem in kernels/configs")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    ap.add_argument("--cases", nargs="*", default=CASES, help="OUT:T:D:K (none: only --fused)")
    ap.add_argument("--mode", choices=["plan", "column"], help="metadata mode for K > 1")
    ap.add_argument("--fused", nargs="*", default=[], help="IN:OUTxSLICES:T:D:K")
    args = ap.parse_args()
    # The GPU's tuned configs and Hopper's programmatic dependent launch, on a CPU host.
    kernel_configs.gpu_config_name = lambda device=None: args.gpu
    lora_shrink_op.pdl_supported = lora_expand_op.pdl_supported = lambda device: args.arch >= 90
    fused_linear_lora_op.pdl_supported = lambda device: args.arch >= 90
    limit = MAX_SHARED.get(args.arch, 101376)
    for module in (lora_shrink_op, fused_linear_lora_op):  # they fit their stages to it
        module.shared_memory_limit = lambda device: limit
    target = GPUTarget("cuda", args.arch, 32)
    runs = [(case, {}, record_launches(case, args.mode)) for case in args.cases]
    runs += [
        (case, {"placement": "loop" if in_loop else "apart"}, record_fused_launches(case, in_loop))
        for case in args.fused
        for in_loop in (True, False)
    ]
    for case, extra, launches in runs:
        for fn, grid, launch_args, cx, opts in launches:
            line = {
                "case": case,
                **extra,
                "kernel": fn.__name__,
                "grid": list(grid),
                "num_warps": opts["num_warps"],
                "num_stages": opts["num_stages"],
                **{name: cx[name] for name in SHOWN if name in cx},
                **compile_usage(fn, launch_args, cx, opts, target),
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
