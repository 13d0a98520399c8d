"""Device-side helpers shared by the kernels that work on several output slices (shrink, expand,
fused GEMM): each picks its slice's operands from the three it is given."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def slice_of_b(
    s, b0_ptr, b1_ptr, b2_ptr, out0, out1, out2, off0, off1, off2, sbs0, sbs1, sbs2,
    N_SLICES: tl.constexpr,
):  # fmt: skip
    """Slice s's operands (s < N_SLICES <= 3): its B pointer, its width, its first column of
    y (and row of a fused W), and B's stride between slots."""
    b_ptr, out_s, col_off, stride_bs = b0_ptr, out0, off0, sbs0
    if N_SLICES > 1:  # noqa: SIM102 (constexpr test, then a runtime one)
        if s == 1:
            b_ptr, out_s, col_off, stride_bs = b1_ptr, out1, off1, sbs1
    if N_SLICES > 2:  # noqa: SIM102
        if s == 2:
            b_ptr, out_s, col_off, stride_bs = b2_ptr, out2, off2, sbs2
    return b_ptr, out_s, col_off, stride_bs


@triton.jit
def slice_of_a(s, a0_ptr, a1_ptr, a2_ptr, sas0, sas1, sas2, N_SLICES: tl.constexpr):
    """Slice s's A pointer and A's stride between slots (s < N_SLICES <= 3)."""
    a_ptr, stride_as = a0_ptr, sas0
    if N_SLICES > 1:  # noqa: SIM102 (constexpr test, then a runtime one)
        if s == 1:
            a_ptr, stride_as = a1_ptr, sas1
    if N_SLICES > 2:  # noqa: SIM102
        if s == 2:
            a_ptr, stride_as = a2_ptr, sas2
    return a_ptr, stride_as
