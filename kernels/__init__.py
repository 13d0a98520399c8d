"""Triton kernels for heterogeneous multi-LoRA batches, and their plain-torch references.

Public API: :class:`LoraBatchMeta` and :func:`build_lora_meta` (once per step),
:func:`add_lora` (per projection) and :func:`add_lora_ref` (the reference it is tested
against); the two stages are :func:`lora_shrink` and :func:`lora_expand`;
:func:`linear_beside_lora` runs a base projection and its delta, the delta's kernels beside the
GEMM under CUDA graph capture; :func:`fused_linear_lora` computes both in one GEMM kernel, the
delta in its epilogue (decode sizes).
See docs/kernels.md.
"""

from kernels import _common  # noqa: F401  (sets TRITON_INTERPRET on machines without CUDA)
from kernels.add_lora_op import add_lora
from kernels.fused_linear_lora_op import fused_linear_lora
from kernels.linear_lora_op import linear_beside_lora, overlapped
from kernels.lora_expand_op import lora_expand
from kernels.lora_shrink_op import lora_shrink
from kernels.metadata import LoraBatchMeta, build_lora_meta
from kernels.reference import add_lora_ref, lora_expand_ref, lora_shrink_ref

__all__ = [
    "LoraBatchMeta",
    "add_lora",
    "add_lora_ref",
    "build_lora_meta",
    "fused_linear_lora",
    "linear_beside_lora",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "overlapped",
]
