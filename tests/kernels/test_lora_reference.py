"""The references against an independent dense formulation, and each kernel stage vs its ref."""

from __future__ import annotations

import pytest
import torch
from kernels_assert import assert_close
from kernels_cases import make_batch

from kernels import (
    add_lora_ref,
    build_lora_meta,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
)


def test_add_lora_ref_matches_dense_delta_weights() -> None:
    """y += sum_k w * x @ (scale * B[:, :r] @ A[:r]).T, in float64, the merged-weight view."""
    b = make_batch(
        tokens=13,
        in_features=24,
        outs=[10, 6],
        r_max=8,
        num_slots=4,
        k=3,
        mixed_ranks=(0, 2, 8),
        dtype=torch.float64,
        seed=4,
    )
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, torch.device("cpu"))
    y = b.y.clone()
    add_lora_ref(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    expected = b.y.clone()
    for s, (a, bb) in enumerate(zip(b.lora_a, b.lora_b, strict=True)):
        cols = slice(sum(x.shape[1] for x in b.lora_b[:s]), None)
        for t in range(13):
            for slot, w in zip(b.token_slots[t].tolist(), b.token_weights[t].tolist(), strict=True):
                if slot < 0:
                    continue
                r = int(b.ranks[s, slot])
                dense = b.scales[s, slot].double() * bb[slot, :, :r] @ a[slot, :r]
                expected[t, cols][: bb.shape[1]] += w * (dense @ b.x[t])
    assert_close(y, expected, atol=1e-6, rtol=1e-6, what="y")  # fp32 weights


def test_refs_of_empty_batch_do_nothing() -> None:
    b = make_batch(tokens=0, in_features=8, outs=[4], r_max=2, num_slots=2)
    meta = build_lora_meta(b.token_slots, b.token_weights, 2, torch.device("cpu"))
    add_lora_ref(b.y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    assert b.y.shape == (0, 4)


@pytest.mark.parametrize("k", [1, 3])
def test_shrink_and_expand_stages(device: torch.device, k: int) -> None:
    b = make_batch(
        tokens=17,
        in_features=48,
        outs=[20, 12, 12],
        r_max=16,
        num_slots=5,
        k=k,
        mixed_ranks=(4, 16),
        dtype=torch.float32,
        device=device,
        seed=9,
    )
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    h = lora_shrink(b.x, b.lora_a, b.ranks, meta)
    h_ref = lora_shrink_ref(b.x, b.lora_a, b.ranks, meta)
    valid = torch.zeros_like(h_ref, dtype=torch.bool)  # entries the contract defines
    slots, ranks = meta.token_slots.cpu(), b.ranks.cpu()
    for s in range(3):
        for t in range(17):
            for j in range(meta.max_k):
                if slots[t, j] >= 0:
                    valid[s, t, j, : ranks[s, slots[t, j]]] = True
    got = h.sum(0).cpu()
    assert_close(got[valid], h_ref[valid], atol=1e-4, rtol=1e-4, what="h")
    y, y_ref = b.y.clone(), b.y.clone()
    lora_expand(y, h, b.lora_b, b.ranks, b.scales, meta)
    lora_expand_ref(y_ref, h.sum(0).cpu(), b.lora_b, b.ranks, b.scales, meta)
    assert_close(y, y_ref, atol=1e-4, rtol=1e-4, what="y")


def test_assert_close_reports_the_worst_elements() -> None:
    e = torch.zeros(3, 4)
    a = e.clone()
    a[1, 2], a[2, 0], a[0, 3] = 5.0, float("nan"), 0.5
    with pytest.raises(AssertionError) as info:
        assert_close(a, e, atol=1e-3, rtol=0, what="demo")
    msg = str(info.value)
    assert "3 of 12 elements off" in msg
    lines = msg.splitlines()
    assert "(2, 0)" in lines[1] and "(1, 2)" in lines[2] and "(0, 3)" in lines[3]
