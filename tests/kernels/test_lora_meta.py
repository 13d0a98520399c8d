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


def test_running_example_of_the_docstring() -> None:
    slots = torch.tensor([[2, -1], [-1, -1], [0, 2], [2, -1], [2, -1], [2, 0]])
    weights = torch.tensor([[1, 0], [0, 0], [0.5, 0.5], [1, 0], [1, 0], [0.3, 0.7]])
    m = build_lora_meta(slots, weights, num_slots=4, device=torch.device("cpu"), block_m=2)
    assert _l(m.token_slots) == [[2, -1], [-1, -1], [0, 2], [2, -1], [2, -1], [0, 2]]
    assert _close(m.token_weights, [[1, 0], [0, 0], [0.5, 0.5], [1, 0], [1, 0], [0.7, 0.3]])
    assert _l(m.sorted_tokens) == [2, 5, 0, 3, 4, 1]
    assert _close(m.sorted_weights, [[0.5, 0.5], [0.7, 0.3], [1, 0], [1, 0], [1, 0], [0, 0]])
    assert _l(m.tile_start) == [0, 2, 4]
    assert _l(m.tile_len) == [2, 2, 1]
    assert _l(m.tile_slots) == [[0, 2], [2, -1], [2, -1]]
    assert (m.num_tokens, m.max_k, m.num_active, m.num_tiles, m.grid_tiles) == (6, 2, 5, 3, 3)
    assert m.token_slots.dtype == torch.int32 and m.token_weights.dtype == torch.float32


def test_duplicates_merge_and_zero_weights_drop() -> None:
    slots = torch.tensor([[3, 3, 1, -1], [0, 2, 0, 0], [1, -1, 2, 2]])
    weights = torch.tensor([[0.25, 0.5, 0.0, 0.9], [1.0, 0.0, 2.0, 3.0], [0.5, 9.0, 0.25, 0.25]])
    m = build_lora_meta(slots, weights, num_slots=4, device=torch.device("cpu"), block_m=16)
    assert _l(m.token_slots) == [[3, -1, -1, -1], [0, -1, -1, -1], [1, 2, -1, -1]]
    assert _close(m.token_weights, [[0.75, 0, 0, 0], [6, 0, 0, 0], [0.5, 0.5, 0, 0]])


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize(("k", "block_m"), [(1, 16), (3, 4)])
def test_tiles_cover_every_active_token_once(popularity: str, k: int, block_m: int) -> None:
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
    )
    plans, order = _l(m.token_slots), _l(m.sorted_tokens)
    assert sorted(order) == list(range(70))
    active = [t for t in range(70) if plans[t][0] >= 0]
    assert m.num_active == len(active) and set(order[: m.num_active]) == set(active)
    seen: list[int] = []
    for i in range(m.grid_tiles):
        start, length = int(m.tile_start[i]), int(m.tile_len[i])
        assert 0 <= length <= block_m and (length > 0) == (i < m.num_tiles)
        for row in range(start, start + length):
            assert plans[order[row]] == _l(m.tile_slots[i])
            assert _l(m.sorted_weights[row]) == _l(m.token_weights[order[row]])
            seen.append(order[row])
        if length == 0:
            assert _l(m.tile_slots[i]) == [-1] * k
    assert sorted(seen) == sorted(active)


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
]


@pytest.mark.parametrize(("slots", "weights", "num_slots", "kw", "match"), BAD)
def test_invalid_plans_are_refused(slots, weights, num_slots, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_lora_meta(slots, weights, num_slots, torch.device("cpu"), **kw)
