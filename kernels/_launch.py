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
directly, through its C launcher (``CompiledKernel.run``, what ``CompiledKernel[grid]`` calls,
minus its per-call closure and hook lookups; with a profiler's launch hook set, through
``CompiledKernel[grid]`` itself). Where a key could be wrong it only has more entries than
Triton's cache, never fewer: two calls share a variant only when Triton would pick the same.

:func:`compile_only` makes launchers compile without launching, on a thread pool when the
installed Triton has ``AsyncCompileMode``: the engine's warm-up compiles its ~100 variants
at once instead of one after another.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from kernels._common import INTERPRET

try:  # Triton's launch hooks (profilers set them); with one set, launches take Triton's path
    from triton import knobs
except ImportError:  # an older Triton
    knobs = None
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

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
        self.compiled: dict[tuple, tuple] = {}  # key -> (kernel, run, function, metadata)
        self._split = None  # (tensors, specialised ints, unspecialised ints) getters

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
        entry = self.compiled.get(key)
        if entry is None:
            kernel = self.fn[grid](*args, **constexprs, **options)
            if type(kernel).__name__ == "FutureKernel":  # compiled asynchronously: finished now
                kernel = kernel.result()
            if kernel is not None and hasattr(kernel, "run"):
                kernel._init_handles()
                self.compiled[key] = (kernel, kernel.run, kernel.function, kernel.packed_metadata)
            return
        kernel, run, function, metadata = entry
        g = (*grid, 1, 1)
        if _raw_stream is None or knobs is None or knobs.runtime.launch_enter_hook is not None:
            kernel[g[:3]](*args, *values)
            return
        # What CompiledKernel[grid](...) does, without its per-call closure and hook lookups.
        stream = _raw_stream(torch.cuda.current_device())
        run(g[0], g[1], g[2], stream, function, metadata, None, None, None, *args, *values)

    def _key(self, args: tuple, constexpr_values: tuple, options: dict) -> tuple:
        """What Triton picks a variant by; ``constexpr_values`` in declaration order.

        Which arguments are tensors is learnt from the first call (the wrappers pass the same
        kinds every time); a call that breaks the pattern fails loudly (no ``dtype`` on an int)
        or only misses the cache (a tensor where an int was hashes by identity)."""
        if self._split is None:
            tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            unspec = [i for i in self.unspecialized if i not in tensors]
            ints = [i for i in range(len(args)) if i not in tensors and i not in unspec]
            self._split = tuple(_getter(idx) for idx in (tensors, ints, unspec))
        tensors, ints, unspec = (get(args) for get in self._split)
        return (
            constexpr_values,
            tuple(options.values()),
            tuple(options),
            tuple((t.dtype, t.data_ptr() & 15 == 0) for t in tensors),
            ints,
            tuple((_I32[0] <= a <= _I32[1], a >= 2**63) for a in unspec),  # i32, i64, u64
            torch.cuda.current_device() if FAST else None,
        )


def _getter(indices: list[int]):
    """args -> the tuple of args at ``indices`` (operator.itemgetter, always a tuple)."""
    if not indices:
        return lambda args: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*indices)


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
