"""linear_beside_lora: base GEMM and LoRA delta, the delta's kernels on a side stream when
captured."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from kernels_assert import assert_close
from kernels_cases import DTYPES, linear_weights, make_batch

from kernels import add_lora_ref, build_lora_meta, linear_beside_lora, overlapped


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


def _weights(b, dtype, device):
    return linear_weights(sum(x.shape[1] for x in b.lora_b), b.x.shape[1], dtype, device)


@pytest.mark.parametrize("fresh", [True, False])
def test_linear_beside_lora_sums_to_the_projection_plus_the_delta(
    device: torch.device, fresh: bool
) -> None:
    """y + into is the projection plus the delta (plus into). The delta goes into ``into``
    when given, or when the call branches (a new buffer); else into y, and None comes back."""
    dtype = torch.float16
    b = _batch(device, dtype, seed=4, k=1, popularity="zipf")
    weight, bias = _weights(b, dtype, device)
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    atol, rtol = DTYPES[dtype]
    before = None if fresh else b.y.clone()  # into's value before the call
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
        if fresh and not branched:
            assert out is None
        else:
            assert out is not None and (fresh or out is into)
            assert_close(y, F.linear(b.x, weight, bias), atol=atol, rtol=rtol, what="bare y")
        total = y if out is None else y + out
        assert_close(total, want, atol=atol, rtol=rtol, what=f"y + into, branch={branched}")


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
@pytest.mark.parametrize("mode", ["plan", "column"])
def test_captured_branches_replay_with_new_plans(
    mode: str, gemm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Captured, the LoRA kernels are a branch beside the GEMM (cuBLAS's or our Triton one);
    replays with new plans are exact."""
    monkeypatch.setenv("LORASERVE_KERNELS_BESIDE_GEMM", gemm)
    dev, dtype = torch.device("cuda"), torch.bfloat16

    def batch(seed: int, popularity: str):
        return make_batch(
            tokens=48,
            in_features=1024,
            outs=[512, 256, 256],
            r_max=16,
            num_slots=12,
            k=2,
            popularity=popularity,
            dtype=dtype,
            device=dev,
            seed=seed,
        )

    b = batch(21, "uniform")
    weight, bias = _weights(b, dtype, dev)
    meta = build_lora_meta(
        b.token_slots, b.token_weights, b.num_slots, dev, pad_tiles_to=48, mode=mode
    )
    args = (b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    residual = torch.zeros(48, 1024, dtype=dtype, device=dev)

    def step():
        residual.zero_()
        base, into = linear_beside_lora(b.x, weight, bias, *args, into=residual)
        fresh_base, fresh = linear_beside_lora(b.x, weight, bias, *args)
        return base + into, fresh_base + fresh  # the consumers join the branches

    with overlapped():  # compile the variants the capture launches, outside it
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, y2 = step()
    atol, rtol = DTYPES[dtype]
    for seed in (22, 23, 24):
        new = batch(seed, "zipf")
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
        assert_close(y2, want, atol=atol, rtol=rtol, what=f"replay {seed}, new delta buffer")
