"""build_lora_meta: the running example of kernels/metadata.py, invariants, validation."""

from __future__ import annotations

import pytest
import torch
from kernels_cases import POPULARITY, make_batch

from kernels import build_lora_meta


def _l(t: torch.Tensor) -> list:
    return t.cpu().tolist()


def _close(t: torch.Tensor, expected: list) -> bool:
    return torch.allclose(t.cpu(), torch.tensor(expected, dtype=t.dtype))


EXAMPLE_SLOTS = [[2, -1], [-1, -1], [0, 2], [2, -1], [2, -1], [2, 0]]
EXAMPLE_WEIGHTS = [[1, 0], [0, 0], [0.5, 0.5], [1, 0], [1, 0], [0.3, 0.7]]


def _example(mode: str):
    return build_lora_meta(
        torch.tensor(EXAMPLE_SLOTS),
        torch.tensor(EXAMPLE_WEIGHTS),
        num_slots=4,
        device=torch.device("cpu"),
        block_m=2,
        mode=mode,
    )


def test_running_example_of_the_docstring_plan_mode() -> None:
    m = _example("plan")
    assert _l(m.token_slots) == [[2, -1], [-1, -1], [0, 2], [2, -1], [2, -1], [0, 2]]
    assert _close(m.token_weights, [[1, 0], [0, 0], [0.5, 0.5], [1, 0], [1, 0], [0.7, 0.3]])
    assert _l(m.row_tokens) == [2, 5, 0, 3, 4, 0]
    assert _close(m.row_weights, [[0.5, 0.5], [0.7, 0.3], [1, 0], [1, 0], [1, 0], [0, 0]])
    assert _l(m.tile_start) == [0, 2, 4]
    assert _l(m.tile_len) == [2, 2, 1]
    assert _l(m.tile_col) == [0, 0, 0]
    assert _l(m.tile_slots) == [[0, 2], [2, -1], [2, -1]]
    assert _l(m.slot_list) == [2, 0, 2, 0, 0]
    assert (m.mode, m.tile_k, m.pass_tiles) == ("plan", 2, (3,))
    assert (m.num_tokens, m.max_k, m.num_active, m.num_tiles, m.grid_tiles) == (6, 2, 5, 3, 3)
    assert m.token_slots.dtype == torch.int32 and m.token_weights.dtype == torch.float32


def test_running_example_of_the_docstring_column_mode() -> None:
    m = _example("column")
    assert _l(m.row_tokens) == [2, 5, 0, 3, 4, 2, 5] + [0] * 5
    assert _close(m.row_weights, [[0.5], [0.7], [1], [1], [1], [0.5], [0.3]] + [[0]] * 5)
    assert _l(m.tile_start) == [0, 2, 4, 5]
    assert _l(m.tile_len) == [2, 2, 1, 2]
    assert _l(m.tile_col) == [0, 0, 0, 1]
    assert _l(m.tile_slots) == [[0], [2], [2], [2]]
    assert (m.mode, m.tile_k, m.pass_tiles, m.num_tiles) == ("column", 1, (3, 1), 4)


def test_padding_per_pass() -> None:
    m = build_lora_meta(
        torch.tensor(EXAMPLE_SLOTS),
        torch.tensor(EXAMPLE_WEIGHTS),
        num_slots=4,
        device=torch.device("cpu"),
        block_m=2,
        mode="column",
        pad_tiles_to=6,
    )
    assert m.pass_tiles == (6, 6) and m.grid_tiles == 12 and m.num_tiles == 4
    assert _l(m.tile_len) == [2, 2, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0]
    assert _l(m.tile_col)[6] == 1 and _l(m.tile_slots)[3] == [-1]


def test_auto_mode_picks_column_for_distinct_plans_only() -> None:
    gen = torch.Generator().manual_seed(0)
    # a per-token top-2 over 64 adapters: plans mostly distinct -> column
    top2 = torch.stack([torch.randperm(64, generator=gen)[:2] for _ in range(512)])
    m = build_lora_meta(top2, torch.full((512, 2), 0.5), 64, torch.device("cpu"), block_m=32)
    assert m.mode == "column"
    # requests of 64 tokens sharing one 2-adapter mixture -> plan
    same = top2[torch.arange(512) // 64]
    m = build_lora_meta(same, torch.full((512, 2), 0.5), 64, torch.device("cpu"), block_m=32)
    assert m.mode == "plan"


def test_duplicates_merge_and_zero_weights_drop() -> None:
    slots = torch.tensor([[3, 3, 1, -1], [0, 2, 0, 0], [1, -1, 2, 2]])
    weights = torch.tensor([[0.25, 0.5, 0.0, 0.9], [1.0, 0.0, 2.0, 3.0], [0.5, 9.0, 0.25, 0.25]])
    m = build_lora_meta(slots, weights, num_slots=4, device=torch.device("cpu"), block_m=16)
    assert _l(m.token_slots) == [[3, -1, -1, -1], [0, -1, -1, -1], [1, 2, -1, -1]]
    assert _close(m.token_weights, [[0.75, 0, 0, 0], [6, 0, 0, 0], [0.5, 0.5, 0, 0]])


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize(
    ("k", "block_m", "mode"), [(1, 16, "plan"), (3, 4, "plan"), (3, 8, "column")]
)
def test_tiles_cover_every_pair_once(popularity: str, k: int, block_m: int, mode: str) -> None:
    b = make_batch(
        tokens=70,
        in_features=8,
        outs=[8],
        r_max=4,
        num_slots=12,
        k=k,
        popularity=popularity,
        seed=k,
    )
    m = build_lora_meta(
        b.token_slots,
        b.token_weights,
        b.num_slots,
        torch.device("cpu"),
        block_m=block_m,
        pad_tiles_to=70,
        mode=mode,
    )
    plans, weights = _l(m.token_slots), _l(m.token_weights)
    rows, row_w = _l(m.row_tokens), _l(m.row_weights)
    expected = {(t, j) for t in range(70) for j in range(k) if plans[t][j] >= 0}
    seen: list[tuple[int, int]] = []
    pass_of_tile = [p for p, n in enumerate(m.pass_tiles) for _ in range(n)]
    tokens_in_pass: dict[int, list[int]] = {}
    for i in range(m.grid_tiles):
        start, length, col = int(m.tile_start[i]), int(m.tile_len[i]), int(m.tile_col[i])
        tslots = _l(m.tile_slots[i])
        assert 0 <= length <= block_m
        if length == 0:
            assert tslots == [-1] * m.tile_k
        for row in rows[start : start + length]:
            tokens_in_pass.setdefault(pass_of_tile[i], []).append(row)
        for off in range(length):
            t = rows[start + off]
            for j, slot in enumerate(tslots):
                if slot < 0:
                    continue
                assert plans[t][col + j] == slot
                assert row_w[start + off][j] == weights[t][col + j]
                seen.append((t, col + j))
    assert sorted(seen) == sorted(expected)
    assert m.num_active == len({t for t, _ in expected})
    for toks in tokens_in_pass.values():  # no token twice in one expand pass
        assert len(toks) == len(set(toks))


def test_empty_batch() -> None:
    m = build_lora_meta(
        torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2), 3, torch.device("cpu")
    )
    assert (m.num_tokens, m.num_active, m.num_tiles, m.grid_tiles) == (0, 0, 0, 0)
    assert m.tile_slots.shape == (0, 2)


def test_default_device_and_block_m_on_cpu() -> None:
    m = build_lora_meta(torch.tensor([[0]]), torch.tensor([[1.0]]), 1)
    assert m.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert m.block_m >= 16


BAD = [
    (torch.zeros(3, dtype=torch.int32), torch.zeros(3), 2, {}, "must both be"),
    (torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, 5), 2, {}, "K=5"),
    (torch.tensor([[2]]), torch.ones(1, 1), 2, {}, "slot indices"),
    (torch.tensor([[-2]]), torch.ones(1, 1), 2, {}, "slot indices"),
    (torch.tensor([[0]]), torch.ones(1, 1), 2, {"block_m": 24}, "power of two"),
    (torch.tensor([[0], [1]]), torch.ones(2, 1), 2, {"pad_tiles_to": 1}, "pad_tiles_to"),
    (torch.tensor([[0]]), torch.ones(1, 1), 2, {"mode": "rows"}, "mode"),
]


@pytest.mark.parametrize(("slots", "weights", "num_slots", "kw", "match"), BAD)
def test_invalid_plans_are_refused(slots, weights, num_slots, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_lora_meta(slots, weights, num_slots, torch.device("cpu"), **kw)


def test_pad_buckets_pick_the_smallest_that_fits() -> None:
    """Graphs are captured per tile bucket; the builder pads to the smallest bucket that holds
    the step's tiles, and refuses a step that needs more than the largest."""
    slots = torch.tensor([[0], [0], [1], [-1], [2], [2]], dtype=torch.int32)
    w = (slots >= 0).float()
    cpu = torch.device("cpu")
    meta = build_lora_meta(slots, w, 4, cpu, block_m=16, pad_tiles_to=[8, 1, 4])
    assert (meta.num_tiles, meta.grid_tiles) == (3, 4)
    one = build_lora_meta(slots[:2], w[:2], 4, cpu, block_m=16, pad_tiles_to=[1, 4, 8])
    assert one.grid_tiles == 1
    with pytest.raises(ValueError, match="tiles needed"):
        build_lora_meta(slots, w, 4, cpu, block_m=16, pad_tiles_to=[1, 2])


def test_index_buffers_are_views_of_two_packed_buffers() -> None:
    """A captured graph's meta is refreshed by copying int_buf and float_buf only."""
    slots = torch.tensor([[0, 2], [1, -1], [-1, -1], [2, 0]], dtype=torch.int32)
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0], [0.3, 0.7]])
    a = build_lora_meta(slots, weights, 4, torch.device("cpu"), block_m=16, pad_tiles_to=4)
    b = build_lora_meta(
        slots.flip(0), weights.flip(0), 4, torch.device("cpu"), block_m=16, pad_tiles_to=4
    )
    a.int_buf.copy_(b.int_buf)
    a.float_buf.copy_(b.float_buf)
    names = ("token_slots", "row_tokens", "tile_start", "tile_len", "tile_col", "tile_slots")
    for name in (*names, "slot_list"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("token_weights", "row_weights"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
