"""The launch path: metadata views aligned for Triton, the direct-launch cache's keys, and
(on the GPU) results of direct launches equal to Triton's own launch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernels_assert import assert_close
from kernels_cases import make_batch

from kernels import add_lora, add_lora_ref, build_lora_meta
from kernels._common import fit_stages
from kernels._launch import Launcher
from kernels.lora_expand_op import _launch_expand
from kernels.lora_shrink_op import _lora_shrink_kernel


@pytest.mark.parametrize("mode", ["plan", "column"])
@pytest.mark.parametrize("tokens", [1, 3, 5, 17, 30])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_meta_view_starts_16_byte_aligned(tokens: int, k: int, mode: str) -> None:
    """Triton specialises on each pointer's 16-byte alignment: views at offsets that moved
    with T and the tile count compiled new kernel variants while serving."""
    g = np.random.default_rng(tokens * 10 + k)
    slots = torch.from_numpy(g.integers(-1, 6, (tokens, k)).astype(np.int32))
    weights = torch.rand(tokens, k)
    for pad in (None, 2 * tokens * k + 1):
        meta = build_lora_meta(slots, weights, 6, torch.device("cpu"), mode=mode, pad_tiles_to=pad)
        views = {
            f: getattr(meta, f)
            for f in (
                "token_slots",
                "token_weights",
                "row_tokens",
                "row_weights",
                "tile_start",
                "tile_len",
                "tile_col",
                "tile_slots",
            )
        }
        misaligned = [f for f, v in views.items() if v.data_ptr() % 16]
        assert not misaligned, f"T={tokens} K={k} {mode} pad={pad}: {misaligned}"


def _shrink_args(x: torch.Tensor, h: torch.Tensor, ints: tuple) -> tuple:
    return (x, h, x, x, x, h, h, h, h, h, h, *ints)


def test_launch_keys_separate_what_triton_specialises_on() -> None:
    """Two calls share a compiled variant only if Triton would give them the same one."""
    launcher = Launcher(_lora_shrink_kernel, unspecialized=("stride_hsp", "stride_hs"))
    assert launcher.num_runtime == 20 and launcher.constexpr_names[0] == "TILE_K"
    x = torch.zeros(64, dtype=torch.bfloat16)
    h = torch.zeros(64)
    ints = (4096, 128, 8, 4096, 65536, 4096, 3 * 48 * 16, 48 * 16, 16)
    cx, opts = (1,) * len(launcher.constexpr_names), {"num_warps": 4}
    key = launcher._key(_shrink_args(x, h, ints), cx, opts)
    assert key == launcher._key(_shrink_args(x, h, ints), cx, opts)
    # h's strides move with T and are not specialised: an equal key
    moved = ints[:6] + (3 * 49 * 16, 49 * 16, 16)
    assert key == launcher._key(_shrink_args(x, h, moved), cx, opts)
    # ... unless one leaves Triton's 32-bit range
    wide = ints[:6] + (2**31, 49 * 16, 16)
    assert key != launcher._key(_shrink_args(x, h, wide), cx, opts)
    # a specialised int (in_features), a pointer's alignment or dtype, a constexpr, an option
    assert key != launcher._key(_shrink_args(x, h, (4097,) + ints[1:]), cx, opts)
    assert key != launcher._key(_shrink_args(x[1:], h, ints), cx, opts)
    assert key != launcher._key(_shrink_args(x.half(), h, ints), cx, opts)
    assert key != launcher._key(_shrink_args(x, h, ints), (2, *cx[1:]), opts)
    assert key != launcher._key(_shrink_args(x, h, ints), cx, {"num_warps": 8})


def test_launcher_refuses_a_wrong_number_of_arguments() -> None:
    with pytest.raises(TypeError, match="runtime args"):
        _launch_expand((1, 1, 1), (1, 2), {}, {})


@pytest.mark.gpu
def test_direct_launches_equal_the_reference_also_for_a_misaligned_operand() -> None:
    """The second call of a variant launches it directly; a misaligned x (a view two bytes
    into its buffer) must get its own variant, not the aligned one's."""
    dev = torch.device("cuda")
    b = make_batch(
        tokens=40,
        in_features=256,
        outs=[128, 64],
        r_max=16,
        num_slots=8,
        k=2,
        dtype=torch.bfloat16,
        device=dev,
        seed=5,
    )
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, dev)
    y_ref = b.y.clone()
    add_lora_ref(y_ref, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    shifted = torch.empty(b.x.numel() + 1, dtype=b.x.dtype, device=dev)[1:].view_as(b.x)
    shifted.copy_(b.x)
    assert shifted.data_ptr() % 16
    for x in (b.x, b.x, shifted, shifted, b.x):
        y = b.y.clone()
        add_lora(y, x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
        assert_close(y, y_ref, atol=6e-2, rtol=2e-2, what="y")


def test_fit_stages_keeps_the_pipeline_within_shared_memory() -> None:
    """s stages hold s - 1 copies of a stage's tiles; stages drop until they fit, never below
    one. The case is the fused path's 7B shrink with four adapters a token: 16 x rows and 64
    stacked A columns over 512-wide K blocks, bf16, 4 stages (240 KB against the H100's 227)."""
    stage = (16 + 64) * 512 * 2
    assert fit_stages(4, stage, 232448) == 3
    assert fit_stages(4, stage, 10**9) == 4
    assert fit_stages(4, stage, 1) == 1
    assert fit_stages(1, stage, 1) == 1
