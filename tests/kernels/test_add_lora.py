"""add_lora (shrink + expand kernels) against add_lora_ref, on CPU (interpreter) and GPU."""

from __future__ import annotations

import pytest
import torch
from kernels_assert import assert_close
from kernels_cases import DTYPES, POPULARITY, Batch, make_batch

from kernels import add_lora, add_lora_ref, build_lora_meta, lora_expand_op
from kernels.lora_expand_op import chunk_blocks, pass_launches, split_group, zero_rows_without_lora


def _run(b: Batch, device: torch.device, dtype: torch.dtype, **meta_kw) -> None:
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device, **meta_kw)
    assert meta.mode == meta_kw.get("mode", meta.mode)
    y_ref = b.y.clone()
    add_lora_ref(y_ref, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    y = b.y.clone()
    add_lora(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    atol, rtol = DTYPES[dtype]
    assert_close(y, y_ref, atol=atol, rtol=rtol, what="y")
    # Base-only tokens are untouched, bit for bit.
    idle = (b.token_slots < 0).all(dim=1).to(y.device)
    assert torch.equal(y[idle], b.y[idle]), "a base-only token's output changed"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dtypes(device: torch.device, dtype: torch.dtype) -> None:
    b = make_batch(
        tokens=19,
        in_features=96,
        outs=[40],
        r_max=16,
        num_slots=6,
        k=2,
        dtype=dtype,
        device=device,
        seed=1,
    )
    _run(b, device, dtype)


# Weird shapes: primes and non-powers of two for T, in and every out; 1 token; 3 slices.
SHAPES = [
    (1, 131, [29]),
    (7, 53, [97, 31, 31]),
    (37, 67, [17]),
    (23, 256, [64, 32]),
]


@pytest.mark.parametrize(("tokens", "in_features", "outs"), SHAPES)
def test_weird_shapes(device: torch.device, tokens: int, in_features: int, outs: list[int]) -> None:
    b = make_batch(
        tokens=tokens,
        in_features=in_features,
        outs=outs,
        r_max=8,
        num_slots=5,
        k=2,
        dtype=torch.bfloat16,
        device=device,
        seed=tokens,
    )
    _run(b, device, torch.bfloat16)


@pytest.mark.parametrize("rank", [1, 8, 16, 64, 128])
def test_ranks(device: torch.device, rank: int) -> None:
    b = make_batch(
        tokens=9,
        in_features=80,
        outs=[48, 24],
        r_max=rank,
        num_slots=4,
        k=1,
        dtype=torch.float32,
        device=device,
        seed=rank,
    )
    _run(b, device, torch.float32)


@pytest.mark.parametrize(("k", "mode"), [(1, "plan"), (2, "plan"), (4, "plan"), (4, "column")])
def test_mixed_ranks(device: torch.device, k: int, mode: str) -> None:
    """Slots of ranks 1..64 (and empty slots, rank 0) share one batch and one token."""
    b = make_batch(
        tokens=21,
        in_features=72,
        outs=[36, 20],
        r_max=64,
        num_slots=7,
        k=k,
        dtype=torch.float16,
        mixed_ranks=(0, 1, 8, 16, 64),
        device=device,
        seed=k,
    )
    _run(b, device, torch.float16, mode=mode)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize(("k", "mode"), [(1, "plan"), (4, "plan"), (4, "column")])
def test_popularity(device: torch.device, popularity: str, k: int, mode: str) -> None:
    b = make_batch(
        tokens=40,
        in_features=64,
        outs=[32],
        r_max=16,
        num_slots=48,
        k=k,
        popularity=popularity,
        dtype=torch.bfloat16,
        device=device,
        seed=7,
    )
    _run(b, device, torch.bfloat16, mode=mode)


@pytest.mark.parametrize(("block_m", "mode"), [(16, "plan"), (64, "plan"), (16, "column")])
def test_block_m_and_padding(device: torch.device, block_m: int, mode: str) -> None:
    """Tiles longer than a plan's run, and padded (empty) tiles for CUDA-graph replay."""
    b = make_batch(
        tokens=45,
        in_features=40,
        outs=[24, 24, 8, 8],
        r_max=16,
        num_slots=3,
        k=2,
        popularity="zipf",
        dtype=torch.float32,
        device=device,
        seed=3,
    )
    _run(b, device, torch.float32, block_m=block_m, pad_tiles_to=45, mode=mode)


def test_split_k_uneven(device: torch.device) -> None:
    """Several K splits whose last one is partial (in=200, 3 splits of 80)."""
    b = make_batch(
        tokens=11,
        in_features=200,
        outs=[30],
        r_max=16,
        num_slots=4,
        k=2,
        dtype=torch.float32,
        device=device,
        seed=5,
    )
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    y_ref, y = b.y.clone(), b.y.clone()
    add_lora_ref(y_ref, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    add_lora(
        y,
        b.x,
        b.lora_a,
        b.lora_b,
        b.ranks,
        b.scales,
        meta,
        shrink_config={"BLOCK_K": 16, "SPLIT_K": 3, "num_warps": 4, "num_stages": 1},
        expand_config={"BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    )
    assert_close(y, y_ref, atol=1e-4, rtol=1e-4, what="y")


def _many_splits(b: Batch, device: torch.device, shrink_config: dict, block_m: int) -> None:
    meta = build_lora_meta(
        b.token_slots, b.token_weights, b.num_slots, device, block_m=block_m, mode="plan"
    )
    y_ref, y = b.y.clone(), b.y.clone()
    add_lora_ref(y_ref, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    add_lora(
        y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta, shrink_config=shrink_config,
        expand_config={"BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    )  # fmt: skip
    atol, rtol = DTYPES[b.x.dtype]
    assert_close(y, y_ref, atol=atol, rtol=rtol, what="y")


def test_many_splits_are_summed_in_groups(device: torch.device) -> None:
    """More split-K partials than the expand holds in registers at once (K=2, 32-row tiles,
    25 splits): it sums them 16 at a time, the last group partial."""
    b = make_batch(
        tokens=40, in_features=400, outs=[48], r_max=16, num_slots=5, k=2, device=device, seed=9
    )
    cfg = {"BLOCK_K": 16, "SPLIT_K": 25, "num_warps": 4, "num_stages": 1}
    assert split_group(25, 2, 32, 16, cfg["num_warps"]) == 16
    _many_splits(b, device, cfg, 32)


def test_an_odd_count_of_splits_at_once_into_two_sums(device: torch.device) -> None:
    """17 split-K partials of K=2 plan tiles (16 rows), all loaded at once: the stacked expand
    adds 16 or more of them into two sums, the last one alone."""
    b = make_batch(
        tokens=40, in_features=272, outs=[48], r_max=16, num_slots=5, k=2, device=device, seed=11
    )
    cfg = {"BLOCK_K": 16, "SPLIT_K": 17, "num_warps": 4, "num_stages": 1}
    assert split_group(17, 2, 16, 16, cfg["num_warps"]) == 17
    _many_splits(b, device, cfg, 16)


@pytest.mark.gpu
def test_many_splits_at_prefill_size_on_the_gpu() -> None:
    """64 splits, K=2 and 32-row tiles over 1,024 tokens: with every partial loaded at once,
    ptxas gave the expand 7 KB of stack a thread and the launch failed with an illegal
    memory access on the H100 (docs/benchmarks.md, fourteenth pass)."""
    cuda = torch.device("cuda")
    b = make_batch(
        tokens=1024, in_features=4096, outs=[512], r_max=16, num_slots=8, k=2,
        dtype=torch.bfloat16, device=cuda, seed=10,
    )  # fmt: skip
    _many_splits(b, cuda, {"BLOCK_K": 64, "SPLIT_K": 64, "num_warps": 4, "num_stages": 1}, 32)


def test_chunk_blocks() -> None:
    """Column passes are chunked only with several passes and a y larger than a chunk; the
    chunks then cover every block, none over the byte limit where blocks allow it."""
    assert chunk_blocks(43, 90 << 20, 1, 20 << 20) == 43  # plan mode: one pass
    assert chunk_blocks(43, 90 << 20, 2, 0) == 43  # no limit configured
    assert chunk_blocks(43, 16 << 20, 2, 20 << 20) == 43  # y fits in one chunk
    assert chunk_blocks(43, 90 << 20, 2, 20 << 20) == 9  # 5 chunks: 9, 9, 9, 9, 7 blocks
    assert chunk_blocks(16, 32 << 20, 2, 16 << 20) == 8
    assert chunk_blocks(3, 1 << 30, 4, 1) == 1  # at most one chunk per block


def test_pass_launches() -> None:
    """Two passes over several chunks share launches in a wavefront (each pass over a chunk
    one launch after the pass before it over that chunk); otherwise one pass a launch."""
    assert pass_launches(2, [0]) == [[(0, 0)], [(1, 0)]]
    assert pass_launches(2, [0, 9, 18]) == [
        [(0, 0)], [(1, 0), (0, 9)], [(1, 9), (0, 18)], [(1, 18)]
    ]  # fmt: skip
    assert pass_launches(1, [0, 5]) == [[(0, 0)], [(0, 5)]]
    assert pass_launches(3, [0, 5]) == [[(0, 0)], [(1, 0)], [(2, 0)], [(0, 5)], [(1, 5)], [(2, 5)]]


def _chunked_and_whole(b: Batch, device: torch.device, store: bool, **expand) -> None:
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device, mode="column")
    assert (
        meta.mode == "column" and len([n for n in meta.pass_tiles if n]) == b.token_slots.shape[1]
    )
    want = torch.zeros_like(b.y) if store else b.y.clone()
    add_lora_ref(want, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    idle = (b.token_slots < 0).all(dim=1).to(device)
    ys = []
    for chunk_bytes in (0, expand.pop("chunk_bytes")):
        y = b.y.clone()
        add_lora(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta, store=store,
                 expand_config={**expand, "Y_CHUNK_BYTES": chunk_bytes})  # fmt: skip
        ys.append(y)
    whole, chunked = ys
    # every element gets its passes' adds in the same order, so the bits are the same
    assert torch.equal(chunked, whole), "chunked column passes changed y"
    atol, rtol = DTYPES[b.y.dtype]
    assert_close(chunked[~idle], want[~idle], atol=atol, rtol=rtol, what="y, chunked passes")
    assert torch.equal(chunked[idle], b.y[idle]), "a base-only token's row changed"


@pytest.mark.parametrize(("k", "store"), [(2, False), (4, False), (2, True)])
def test_column_passes_chunk_by_chunk_of_y(
    device: torch.device, k: int, store: bool, monkeypatch
) -> None:
    """Column mode with y's columns in chunks (Y_CHUNK_BYTES): every pass over one chunk,
    then the next (K=2: the second pass over a chunk and the first over the next in one
    launch); two slices of other widths, 3 chunks of 16-column blocks."""
    mixed = []
    launch = lora_expand_op._launch_expand

    def recorded(grid, args, constexprs, options):
        mixed.append(constexprs["MIXED"])
        launch(grid, args, constexprs, options)

    monkeypatch.setattr(lora_expand_op, "_launch_expand", recorded)
    b = make_batch(
        tokens=29, in_features=48, outs=[40, 24], r_max=16, num_slots=6, k=k,
        dtype=torch.float16, device=device, seed=20 + k,
    )  # fmt: skip
    y_bytes = b.y.numel() * b.y.element_size()
    assert chunk_blocks(3, y_bytes, k, y_bytes // 3 + 1) == 1
    _chunked_and_whole(b, device, store, BLOCK_N=16, num_warps=4, num_stages=1,
                       chunk_bytes=y_bytes // 3 + 1)  # fmt: skip
    # whole passes, then the chunked ones: K=2 in 4 launches, two of them mixed; K=4 in 12
    want = [False] * k + ([False, True, True, False] if k == 2 else [False] * 3 * k)
    assert mixed == want


@pytest.mark.gpu
def test_column_passes_chunk_by_chunk_at_prefill_size_on_the_gpu() -> None:
    """The same at 1,024 tokens, 4096 out, K=2 over 64 slots, bf16, 8 chunks (half the 2 MB
    budget each, two passes): every launch is a programmatic dependent of the one before it,
    seven of them hold the second pass over one chunk and the first over the next."""
    cuda = torch.device("cuda")
    b = make_batch(
        tokens=1024, in_features=4096, outs=[4096], r_max=16, num_slots=64, k=2,
        dtype=torch.bfloat16, device=cuda, seed=21,
    )  # fmt: skip
    _chunked_and_whole(b, cuda, False, BLOCK_N=256, num_warps=4, num_stages=1,
                       chunk_bytes=2 << 20)  # fmt: skip


def test_rows_above_a_rank_never_leak(device: torch.device) -> None:
    """A and B rows at or above a slot's rank hold NaN, and every slot has rank 0 in the
    second slice (adapters without that module): the first slice gets its delta, the second
    slice's columns stay as they were, bit for bit. (The first rank chunk is loaded before the
    ranks are known and masked after the load.)"""
    b = make_batch(
        tokens=17, in_features=48, outs=[24, 40], r_max=16, num_slots=5, k=2, device=device
    )
    b.ranks[0] = torch.tensor([8, 3, 16, 1, 8], dtype=torch.int32)
    b.ranks[1].zero_()
    for s, (a, bb) in enumerate(zip(b.lora_a, b.lora_b, strict=True)):
        for slot in range(b.num_slots):
            r = int(b.ranks[s, slot])
            a[slot, r:] = float("nan")
            bb[slot, :, r:] = float("nan")
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    y_ref, y = b.y.clone(), b.y.clone()
    add_lora_ref(y_ref, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    add_lora(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    assert torch.equal(y[:, 24:], b.y[:, 24:]), "a rank-0 slice's columns changed"
    assert_close(y, y_ref, atol=1e-4, rtol=1e-4, what="y")


@pytest.mark.parametrize(("k", "mode"), [(1, "plan"), (2, "plan"), (2, "column")])
def test_store_mode_overwrites_the_rows_of_tokens_with_adapters(
    device: torch.device, k: int, mode: str
) -> None:
    """store=True: rows of tokens with adapters become their delta, y unread (zeros where all
    of a token's adapters have rank 0 in a slice); rows of base-only tokens keep their bits.
    zero_rows_without_lora then zeroes exactly those: together, a delta buffer from nothing."""
    b = make_batch(
        tokens=23,
        in_features=48,
        outs=[40, 24],
        r_max=16,
        num_slots=5,
        k=k,
        dtype=torch.float16,
        mixed_ranks=(0, 8, 16),
        base_only_frac=0.25,
        device=device,
        seed=11 + k,
    )
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device, mode=mode)
    idle = (b.token_slots < 0).all(dim=1).to(device)
    assert 0 < int(idle.sum()) < 23
    want = torch.zeros_like(b.y)
    add_lora_ref(want, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    y = torch.full_like(b.y, float("nan"))
    y[idle] = b.y[idle]
    add_lora(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta, store=True)
    atol, rtol = DTYPES[torch.float16]
    assert_close(y[~idle], want[~idle], atol=atol, rtol=rtol, what="stored rows")
    assert torch.equal(y[idle], b.y[idle]), "a base-only token's row changed"
    stored = y[~idle].clone()
    zero_rows_without_lora(y, meta)
    assert not y[idle].any() and torch.equal(y[~idle], stored)
    assert_close(y, want, atol=atol, rtol=rtol, what="the delta buffer")
    with pytest.raises(ValueError, match="zero_rows_without_lora: y must be"):
        zero_rows_without_lora(y[:5], meta)


@pytest.mark.parametrize("tokens", [0, 6])
def test_empty_and_base_only(device: torch.device, tokens: int) -> None:
    b = make_batch(
        tokens=tokens,
        in_features=32,
        outs=[16],
        r_max=8,
        num_slots=2,
        k=2,
        base_only_frac=1.0,
        device=device,
    )
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    assert meta.num_active == 0 and meta.num_tiles == 0
    y = b.y.clone()
    add_lora(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    assert torch.equal(y, b.y)


@pytest.mark.gpu
def test_llama_shapes_bf16() -> None:
    """Full-size bf16 projections (4096 -> 4096 and fused qkv) at decode and prefill sizes."""
    for tokens, outs, k in [(3, [4096], 1), (256, [4096, 1024, 1024], 2), (1100, [11008], 1)]:
        b = make_batch(
            tokens=tokens,
            in_features=4096,
            outs=outs,
            r_max=16,
            num_slots=16,
            k=k,
            popularity="zipf",
            dtype=torch.bfloat16,
            device="cuda",
            seed=tokens,
        )
        _run(b, torch.device("cuda"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["plan", "column"])
def test_cuda_graph_capture_and_replay(mode: str) -> None:
    """add_lora captures in a CUDA graph and replays with a new plan of the same shape."""
    dev = torch.device("cuda")
    b = make_batch(
        tokens=32,
        in_features=512,
        outs=[256, 128],
        r_max=16,
        num_slots=8,
        k=2,
        dtype=torch.bfloat16,
        device=dev,
        seed=11,
    )
    meta = build_lora_meta(
        b.token_slots, b.token_weights, b.num_slots, dev, pad_tiles_to=32, mode=mode
    )
    y = b.y.clone()
    add_lora(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        add_lora(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    # New plan, copied into the captured meta's buffers, then replayed.
    new = make_batch(
        tokens=32,
        in_features=512,
        outs=[256, 128],
        r_max=16,
        num_slots=8,
        k=2,
        popularity="zipf",
        dtype=torch.bfloat16,
        device=dev,
        seed=12,
    )
    meta2 = build_lora_meta(new.token_slots, new.token_weights, 8, dev, pad_tiles_to=32, mode=mode)
    meta.int_buf.copy_(meta2.int_buf)  # every index buffer is a view of these two
    meta.float_buf.copy_(meta2.float_buf)
    y.copy_(b.y)
    graph.replay()
    y_ref = b.y.clone()
    add_lora_ref(y_ref, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta2)
    assert_close(y, y_ref, atol=6e-2, rtol=2e-2, what="replayed y")


def test_launch_plans_are_kept_per_operand_layout(device: torch.device) -> None:
    """The second call of a step with the same operand layout reuses the launch plans kept
    on the meta and computes the same; another layout gets plans of its own, validated."""
    b = make_batch(
        tokens=13, in_features=48, outs=[24, 8], r_max=8, num_slots=5, k=2, device=device
    )
    meta = build_lora_meta(b.token_slots, b.token_weights, b.num_slots, device)
    y_ref = b.y.clone()
    add_lora_ref(y_ref, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
    for _ in range(2):
        y = b.y.clone()
        add_lora(y, b.x, b.lora_a, b.lora_b, b.ranks, b.scales, meta)
        assert_close(y, y_ref, atol=1e-4, rtol=1e-4, what="y")
        assert len(meta.plans) == 2  # one shrink and one expand plan
    # the first slice alone: a layout of its own (other A/B lists, ranks, y width)
    y1 = b.y[:, :24].clone()
    y1_ref = y1.clone()
    one = ([b.lora_a[0]], [b.lora_b[0]], b.ranks[:1].contiguous(), b.scales[:1].contiguous())
    add_lora_ref(y1_ref, b.x, *one, meta)
    add_lora(y1, b.x, *one, meta)
    assert_close(y1, y1_ref, atol=1e-4, rtol=1e-4, what="y, one slice")
    assert len(meta.plans) == 4
    # a layout that fails validation is refused, not served from another layout's plan
    with pytest.raises(ValueError, match="share shape"):
        add_lora(b.y.clone(), b.x, [b.lora_a[0], b.lora_a[1][:, :4]], b.lora_b, b.ranks,
                 b.scales, meta)  # fmt: skip
