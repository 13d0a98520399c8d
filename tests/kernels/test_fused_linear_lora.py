"""fused_linear_lora: the base projection with the LoRA delta in its epilogue.

Every case runs with the shrink in the GEMM's main loop and as a kernel of its own (the
``placement`` fixture); the in-loop runs cover steps with more adapters than the loop carries
(the rest shrunk after the main loop)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernels_assert import assert_close
from kernels_cases import DTYPES, linear_weights, make_batch

from kernels import add_lora_ref, build_lora_meta, fused_linear_lora
from kernels.fused_linear_lora_op import _shrink_in_loop, fused_shrink_config


@pytest.fixture(params=["in_loop", "apart"])
def placement(request, monkeypatch) -> str:
    """Where the shrink runs: in the GEMM's main loop, or as its own kernel before it."""
    monkeypatch.setenv(
        "LORASERVE_KERNELS_FUSED_IN_LOOP", "1" if request.param == "in_loop" else "0"
    )
    return request.param


def _check(device, dtype, *, tokens, in_features, outs, r_max=16, k=1, popularity="uniform",
           mixed_ranks=None, bias=True, mode=None, config=None, seed=0) -> None:  # fmt: skip
    b = make_batch(
        tokens=tokens,
        in_features=in_features,
        outs=outs,
        r_max=r_max,
        num_slots=7,
        k=k,
        popularity=popularity,
        mixed_ranks=mixed_ranks,
        dtype=dtype,
        device=device,
        seed=seed,
    )
    weight, bias_t = linear_weights(sum(outs), in_features, dtype, device, seed + 1)
    bias_t = bias_t if bias else None
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device, mode=mode)
    y = fused_linear_lora(
        b.x, weight, bias_t, b.lora_a, b.lora_b, b.ranks, b.scales, meta, config=config
    )
    want = F.linear(b.x, weight, bias_t)
    add_lora_ref(want, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    atol, rtol = DTYPES[dtype]
    assert_close(y, want, atol=atol, rtol=rtol, what=f"fused y ({popularity}, K={k})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_matches_the_projection_plus_the_reference_delta(device, placement, dtype) -> None:
    """Three slices of odd sizes (qkv-like), a prime in_features, a bias, K=2."""
    _check(device, dtype, tokens=23, in_features=97, outs=[48, 24, 40], k=2)


@pytest.mark.parametrize("popularity", ["all_distinct", "zipf", "identical", "one_hot"])
@pytest.mark.parametrize("k", [1, 4])
def test_fused_over_plans(device, placement, popularity: str, k: int) -> None:
    """Per-row slots in one tile: every popularity, K up to 4, plan and column mode."""
    mode = "column" if k > 1 and popularity == "all_distinct" else None
    _check(device, torch.float16, tokens=19, in_features=64, outs=[40, 24], k=k,
           popularity=popularity, mode=mode, bias=False, seed=k)  # fmt: skip


@pytest.mark.parametrize("ranks", [(1, 8, 16), (64, 128)])
def test_fused_mixed_ranks_and_several_tiles(device, placement, ranks) -> None:
    """Mixed ranks in one batch (rows above a rank are garbage in B and never read); more
    tokens than one BLOCK_M and columns than one BLOCK_N; ranks above 16 (several MMA steps);
    the epilogue's walk over 7 slots in groups of 2 (the last one short); in the loop, rank
    128 leaves room for one adapter there, the others shrunk after it."""
    r_max = max(ranks)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1,
              "SLOTS_PER_STEP": 2}  # fmt: skip
    _check(device, torch.float32, tokens=37, in_features=80, outs=[50], r_max=r_max, k=2,
           mixed_ranks=ranks, config=config, seed=7)  # fmt: skip


def test_fused_without_adapters_is_the_projection(device) -> None:
    """No meta, a base-only batch and an empty batch: the plain GEMM (and no LoRA launch)."""
    dtype = torch.float16
    x = torch.randn(9, 72, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    weight, bias = linear_weights(56, 72, dtype, device)
    atol, rtol = DTYPES[dtype]
    want = F.linear(x, weight, bias)
    assert_close(fused_linear_lora(x, weight, bias, None, None, None, None, None), want,
                 atol=atol, rtol=rtol, what="no meta")  # fmt: skip
    b = make_batch(tokens=9, in_features=72, outs=[56], r_max=8, num_slots=3, dtype=dtype,
                   device=device, base_only_frac=1.0)  # fmt: skip
    meta = build_lora_meta(b.token_slots, b.token_weights, 3, device)
    assert meta.num_active == 0
    y = fused_linear_lora(x, weight, bias, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    assert_close(y, want, atol=atol, rtol=rtol, what="base-only batch")
    empty = fused_linear_lora(x[:0], weight, bias, None, None, None, None, None)
    assert empty.shape == (0, 56)


def test_fused_rejects_bad_operands(device, monkeypatch) -> None:
    x = torch.zeros(4, 32, device=device)
    with pytest.raises(ValueError, match="does not match"):
        fused_linear_lora(x, torch.zeros(8, 16, device=device), None, None, None, None, None, None)
    b = make_batch(tokens=4, in_features=32, outs=[8, 8], r_max=8, num_slots=3, device=device)
    meta = build_lora_meta(b.token_slots, b.token_weights, 3, device)
    w = torch.zeros(16, 32, device=device)
    other_rank = [b.lora_b[0], torch.zeros(3, 8, 16, device=device)]
    with pytest.raises(ValueError, match="B slices must share"):
        fused_linear_lora(x, w, None, b.lora_a, other_rank, b.ranks, b.scales, meta)
    for forced in ("1", "0"):  # A of the wrong width, read by the main loop or the shrink
        monkeypatch.setenv("LORASERVE_KERNELS_FUSED_IN_LOOP", forced)
        narrow = [a[..., :16].contiguous() for a in b.lora_a]
        with pytest.raises(ValueError):
            fused_linear_lora(x, w, None, narrow, b.lora_b, b.ranks, b.scales, meta)
        half = [a.half() for a in b.lora_a]
        with pytest.raises(ValueError, match="every weight must be"):
            fused_linear_lora(x, w, None, half, b.lora_b, b.ranks, b.scales, meta)
    with pytest.raises(ValueError, match="rows; meta has"):
        fused_linear_lora(x[:3], w, None, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_lora(
            x, torch.zeros(8, 32, device=device), torch.zeros(7, device=device),
            None, None, None, None, None,
        )  # fmt: skip


def test_fused_shrink_shape_comes_from_the_fused_config(device) -> None:
    """The fused path's shrink takes its own shape from the fused entry's SHRINK_* keys (one
    split, no pipelining here), over the shrink's tuned config, and the pair still matches."""
    keys = {"SHRINK_SPLIT_K": 1, "SHRINK_BLOCK_K": 32, "SHRINK_STAGES": 1, "SHRINK_WARPS": 4}
    shrink = fused_shrink_config(keys, 19, 64, device)
    assert shrink["SPLIT_K"] == 1 and shrink["BLOCK_K"] == 32
    assert shrink["num_stages"] == 1 and shrink["num_warps"] == 4
    assert fused_shrink_config({}, 19, 64, device)["SPLIT_K"] == 4  # the path's default
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1,
              "SLOTS_PER_STEP": 4, **keys}  # fmt: skip
    _check(device, torch.float16, tokens=19, in_features=64, outs=[40], k=2, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 64])
def test_fused_at_7b_size_with_four_adapters_a_token_on_the_gpu(placement, tokens: int) -> None:
    """The tuned fused configs at a 7B projection with K=4 plans (the engine captures its
    mixture graphs with K=4): the shrink shape tuned on one adapter a token needed more
    shared memory than the H100 has with four, until its stages were fitted."""
    _check(torch.device("cuda"), torch.bfloat16, tokens=tokens, in_features=4096, outs=[4096],
           k=4, popularity="zipf", bias=False)  # fmt: skip


def test_the_shrink_rides_the_main_loop_for_steps_of_few_adapters(device, monkeypatch) -> None:
    """By default the main loop carries two rank-16 adapters (LOOP_COLS 32 columns of h), one
    of rank 32 to 64, and a step of more adapters gets the shrink kernel; the config key and
    the environment force either placement."""
    monkeypatch.delenv("LORASERVE_KERNELS_FUSED_IN_LOOP", raising=False)

    def meta_of(adapters: int):
        slots = torch.arange(8, dtype=torch.int32).remainder(adapters)[:, None]
        return build_lora_meta(slots, torch.ones(8, 1), 8, device)

    assert meta_of(2).num_used == 2
    assert _shrink_in_loop({}, meta_of(2), 16) == (True, 2)
    assert _shrink_in_loop({}, meta_of(3), 16) == (False, 2)
    assert _shrink_in_loop({}, meta_of(1), 16) == (True, 1)  # no rows for a second one
    assert _shrink_in_loop({}, meta_of(1), 64) == (True, 1)
    assert _shrink_in_loop({}, meta_of(2), 64) == (False, 1)
    assert _shrink_in_loop({"LOOP_COLS": 64}, meta_of(4), 16) == (True, 4)
    assert _shrink_in_loop({"IN_LOOP": 0}, meta_of(2), 16) == (False, 2)
    assert _shrink_in_loop({"LOOP_USED": [2]}, meta_of(1), 16) == (False, 1)
    assert _shrink_in_loop({"LOOP_USED": [2]}, meta_of(2), 16) == (True, 2)
    assert _shrink_in_loop({"LOOP_USED": [1, 2, 3]}, meta_of(3), 16) == (False, 2)
    monkeypatch.setenv("LORASERVE_KERNELS_FUSED_IN_LOOP", "1")
    assert _shrink_in_loop({}, meta_of(8), 16) == (True, 2)


def _meta_over(adapters: int, tokens: int, num_slots: int, device):
    """One adapter a token, round-robin over the first ``adapters`` slots; the metadata's
    layout padded to a tile a token, so that every count fits one captured graph."""
    slots = (torch.arange(tokens, dtype=torch.int32) % adapters)[:, None]
    weights = torch.rand(tokens, 1, generator=torch.Generator().manual_seed(adapters)) + 0.1
    return build_lora_meta(slots, weights, num_slots, device, pad_tiles_to=tokens)


@pytest.mark.gpu
def test_fused_graphs_replay_steps_of_more_adapters_than_captured(placement) -> None:
    """A graph captured on a step of two adapters (the main loop carries both) replays steps
    of 1 to 16 adapters, the metadata copied into its buffers: past the two, the late shrink
    after the loop covers the rest, so the host's plan at capture never makes a replay wrong."""
    dev = torch.device("cuda")
    b = make_batch(tokens=48, in_features=1024, outs=[512, 256], r_max=16, num_slots=16,
                   dtype=torch.bfloat16, device=dev, seed=7)  # fmt: skip
    weight, bias = linear_weights(768, 1024, torch.bfloat16, dev, 8)
    meta = _meta_over(2, 48, 16, dev)

    def step():
        return fused_linear_lora(b.x, weight, bias, b.lora_a, b.lora_b, b.ranks, b.scales, meta)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    atol, rtol = DTYPES[torch.bfloat16]
    for adapters in (16, 1, 7, 2, 16):
        new = _meta_over(adapters, 48, 16, dev)
        meta.int_buf.copy_(new.int_buf)
        meta.float_buf.copy_(new.float_buf)
        graph.replay()
        torch.cuda.synchronize()
        want = F.linear(b.x, weight, bias)
        add_lora_ref(want, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, new)
        assert_close(y, want, atol=atol, rtol=rtol, what=f"replay, {adapters} adapters")
