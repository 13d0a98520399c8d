"""Launching the LoRA kernels with little host time, and compiling their variants in parallel.

``kernel[grid](...)`` re-derives a kernel's specialisation from every argument on every call
(dtype and 16-byte alignment of each pointer; == 1, multiple of 16 and 32/64-bit of each int)
and looks the variant up by a string key. On the H100 host that is ~100 us per launch, more
than the kernels themselves take at decode sizes: an eager 7B prefill step of 2,048 tokens
makes 256 LoRA launches, and spent 70 ms of host time in them (docs/benchmarks.md).

:class:`Launcher` keeps each variant's ``CompiledKernel`` after its first (ordinary) launch,
under a key built from the same facts Triton specialises on, cheaply: each pointer's dtype and
alignment, the exact value of each specialised int, the 32/64-bit range of the others, the
constexprs and the launch options. Later calls with an equal key launch the compiled kernel
directly (``CompiledKernel[grid]``, Triton's launcher for an already compiled kernel), which
costs what the C launcher costs. Where a key could be wrong it only has more entries than
Triton's cache, never fewer: two calls share a variant only when Triton would pick the same.

:func:`compile_only` makes launchers compile without launching, on a thread pool when the
installed Triton has ``AsyncCompileMode``: the engine's warm-up compiles its ~100 variants
at once instead of one after another.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from kernels._common import INTERPRET

# LORASERVE_KERNELS_FAST_LAUNCH=0 sends every launch through Triton's own path.
FAST = not INTERPRET and os.environ.get("LORASERVE_KERNELS_FAST_LAUNCH", "1") != "0"
_I32 = (-(2**31), 2**31 - 1)

_compile_only = False


class Launcher:
    """Launches one ``@triton.jit`` kernel whose runtime arguments (tensors, ints) all come
    before its constexprs, every constexpr passed by keyword."""

    def __init__(self, fn, unspecialized: tuple[str, ...] = ()):
        self.fn = fn
        params = inspect.signature(fn.fn).parameters.values()  # JIT or interpreted kernel
        names = [p.name for p in params]
        self.constexpr_names = [p.name for p in params if "constexpr" in str(p.annotation)]
        self.num_runtime = len(names) - len(self.constexpr_names)
        if names[self.num_runtime :] != self.constexpr_names:
            raise TypeError(f"{fn.__name__}: constexprs must follow the runtime arguments")
        # ints Triton does not specialise on (do_not_specialize): only their width matters
        self.unspecialized = {names.index(n) for n in unspecialized}
        self.compiled: dict[tuple, object] = {}

    def __call__(self, grid: tuple[int, ...], args: tuple, constexprs: dict, options: dict):
        """``fn[grid](*args, **constexprs, **options)``, directly after a variant's first call."""
        if len(args) != self.num_runtime:
            raise TypeError(
                f"{self.fn.__name__}: {len(args)} runtime args, {self.num_runtime} expected"
            )
        if _compile_only and not INTERPRET:
            self.fn.warmup(*args, grid=grid, **constexprs, **options)
            return
        if not FAST:
            self.fn[grid](*args, **constexprs, **options)
            return
        values = tuple(constexprs[n] for n in self.constexpr_names)
        key = self._key(args, values, options)
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **constexprs, **options)
            if type(kernel).__name__ == "FutureKernel":  # compiled asynchronously: finished now
                kernel = kernel.result()
            if kernel is not None and hasattr(kernel, "run"):
                self.compiled[key] = kernel
            return
        grid = (*grid, 1, 1)[:3] if len(grid) < 3 else grid
        kernel[grid](*args, *values)

    def _key(self, args: tuple, constexpr_values: tuple, options: dict) -> tuple:
        """What Triton picks a variant by; ``constexpr_values`` in declaration order."""
        key: list = [constexpr_values, tuple(options.values()), tuple(options)]
        append, tensor, unspecialized = key.append, torch.Tensor, self.unspecialized
        for i, a in enumerate(args):
            if isinstance(a, tensor):
                append((a.dtype, a.data_ptr() & 15 == 0))
            elif i in unspecialized:  # Triton's int widths: i32, i64, u64
                append((_I32[0] <= a <= _I32[1], a >= 2**63))
            else:
                append(a)
        append(torch.cuda.current_device() if FAST else None)
        return tuple(key)


@contextlib.contextmanager
def compile_only(workers: int | None = None) -> Iterator[None]:
    """Within the block launchers compile their variants and launch nothing; on leaving it
    every compile has finished. Compiles run on ``workers`` threads where Triton supports
    asynchronous compilation (``triton.runtime._async_compile``), else one after another."""
    global _compile_only
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # an older Triton: compile in turn
        AsyncCompileMode = None  # noqa: N806
    workers = workers or min(16, os.cpu_count() or 1)
    _compile_only = True
    try:
        if AsyncCompileMode is None or INTERPRET:
            yield
        else:
            with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool):
                yield
    finally:
        _compile_only = False
