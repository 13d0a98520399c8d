"""linear_add_lora (base GEMM + LoRA delta, the shrink on a side stream under capture)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from kernels_assert import assert_close
from kernels_cases import DTYPES, make_batch

from kernels import (
    add_lora_ref,
    build_lora_meta,
    linear_add_lora,
    linear_beside_lora,
    lora_expand,
    lora_shrink,
    overlapped,
)
from kernels.lora_shrink_op import shrink_buffer


def _batch(device, dtype=torch.float16, seed=3, k=2, popularity="uniform"):
    return make_batch(
        tokens=27,
        in_features=80,
        outs=[48, 24, 24],
        r_max=16,
        num_slots=6,
        k=k,
        popularity=popularity,
        dtype=dtype,
        device=device,
        seed=seed,
    )


def _expected(b, weight, bias, meta) -> torch.Tensor:
    y = F.linear(b.x, weight, bias)
    add_lora_ref(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    return y


def _weights(b, dtype, device, seed=5):
    gen = torch.Generator().manual_seed(seed)
    n_out = sum(x.shape[1] for x in b.lora_b)
    weight = (torch.randn(n_out, b.x.shape[1], generator=gen) / 8).to(dtype).to(device)
    bias = torch.randn(n_out, generator=gen).to(dtype).to(device)
    return weight, bias


@pytest.mark.parametrize("mode", ["plan", "column"])
def test_linear_add_lora_equals_the_base_projection_plus_the_reference_delta(
    device: torch.device, mode: str
) -> None:
    dtype = torch.float16
    b = _batch(device, dtype)
    weight, bias = _weights(b, dtype, device)
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device, mode=mode)
    atol, rtol = DTYPES[dtype]
    for branch in (False, True):  # on CUDA, within overlapped() the shrink is on a side stream
        with overlapped() if branch else contextlib.nullcontext():
            y = linear_add_lora(b.x, weight, bias, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert_close(y, _expected(b, weight, bias, meta), atol=atol, rtol=rtol, what="y")


@pytest.mark.parametrize("fresh", [True, False])
def test_linear_beside_lora_sums_to_the_projection_plus_the_delta(
    device: torch.device, fresh: bool
) -> None:
    """y + into is the projection plus the delta (plus into); on one stream the delta is in
    y and into comes back as given, on a branch y is the bare projection."""
    dtype = torch.float16
    b = _batch(device, dtype, seed=4, k=1, popularity="zipf")
    weight, bias = _weights(b, dtype, device)
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    atol, rtol = DTYPES[dtype]
    before = None if fresh else b.y.clone()
    want = F.linear(b.x, weight, bias) + (0 if fresh else b.y)
    add_lora_ref(want, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    for branch in (False, True):
        into = None if fresh else before.clone()
        with overlapped() if branch else contextlib.nullcontext():
            y, out = linear_beside_lora(
                b.x, weight, bias, b.lora_a, b.lora_b, b.ranks, b.scales, meta, into
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        branched = branch and device.type == "cuda"
        if not fresh:
            assert out is into
        if not branched:
            assert out is into and (fresh or torch.equal(out, before))
        else:
            assert_close(y, F.linear(b.x, weight, bias), atol=atol, rtol=rtol, what="y")
        total = y if out is None else y + out
        assert_close(total, want, atol=atol, rtol=rtol, what=f"y + into, branch={branched}")


def test_expand_reading_y_after_the_wait_equals_the_reference(device: torch.device) -> None:
    """The variant launched behind the base GEMM (``y_early=False``) computes the same delta."""
    b = _batch(device, torch.float32, seed=8, k=4, popularity="zipf")
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    h = shrink_buffer(b.x, b.lora_a, meta)
    lora_shrink(b.x, b.lora_a, b.ranks, meta, out=h)
    y = b.y.clone()
    lora_expand(y, h, b.lora_b, b.ranks, b.scales, meta, y_early=False)
    y_ref = b.y.clone()
    add_lora_ref(y_ref, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    assert_close(y, y_ref, atol=1e-4, rtol=1e-4, what="y")


def test_shrink_refuses_an_out_buffer_of_the_wrong_shape(device: torch.device) -> None:
    b = _batch(device)
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    h = shrink_buffer(b.x, b.lora_a, meta)
    with pytest.raises(ValueError, match="out must be"):
        lora_shrink(b.x, b.lora_a, b.ranks, meta, out=h[:, :, :-1])
    with pytest.raises(ValueError, match="out must be"):
        lora_shrink(b.x, b.lora_a, b.ranks, meta, out=h.double())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["plan", "column"])
def test_captured_branches_replay_with_new_plans(mode: str) -> None:
    """Captured, the LoRA kernels are a branch beside the GEMM; replays with new plans are exact."""
    dev, dtype = torch.device("cuda"), torch.bfloat16
    b = make_batch(
        tokens=48,
        in_features=1024,
        outs=[512, 256, 256],
        r_max=16,
        num_slots=12,
        k=2,
        dtype=dtype,
        device=dev,
        seed=21,
    )
    weight, bias = _weights(b, dtype, dev)
    meta = build_lora_meta(
        b.token_slots, b.token_weights, b.num_slots, dev, pad_tiles_to=48, mode=mode
    )
    args = (b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    with overlapped():  # compile the variants the capture launches, outside it
        linear_add_lora(b.x, weight, bias, *args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear_add_lora(b.x, weight, bias, *args)
        residual = torch.zeros_like(y)
        base, delta = linear_beside_lora(b.x, weight, bias, *args, into=residual)
        y2 = base + delta  # the consumer joins the two branches
    atol, rtol = DTYPES[dtype]
    for seed in (22, 23, 24):
        new = make_batch(
            tokens=48,
            in_features=1024,
            outs=[512, 256, 256],
            r_max=16,
            num_slots=12,
            k=2,
            popularity="zipf",
            dtype=dtype,
            device=dev,
            seed=seed,
        )
        meta2 = build_lora_meta(
            new.token_slots, new.token_weights, 12, dev, pad_tiles_to=48, mode=mode
        )
        meta.int_buf.copy_(meta2.int_buf)
        meta.float_buf.copy_(meta2.float_buf)
        b.x.copy_(new.x)
        graph.replay()
        torch.cuda.synchronize()
        want = _expected(b, weight, bias, meta2)
        assert_close(y, want, atol=atol, rtol=rtol, what=f"replay {seed}")
        assert_close(y2, want, atol=atol, rtol=rtol, what=f"replay {seed}, delta apart")
