"""bench/kernels_bench.py's count of the issue's goals (its last JSON line)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from kernels_bench import goals_summary  # noqa: E402


def _row(out, tokens, adapters, k, marginal_us, base_us=20.0, bound_ratio=1.0, mode="plan"):
    return {
        "case": "lora_delta",
        "out": out,
        "tokens": tokens,
        "adapters": adapters,
        "k": k,
        "mode": mode,
        "marginal_ms": marginal_us / 1e3,
        "base_graph_ms": base_us / 1e3,
        "ratio_bound": bound_ratio,
    }


def test_each_goal_counts_its_rows_and_lists_the_misses() -> None:
    rows = [
        {"case": "copy_bandwidth", "GBps": 3000.0},  # not a delta: ignored
        _row(4096, 64, 8, 1, 6.0),  # decode 0.30: met
        _row(4096, 64, 64, 1, 13.0),  # decode 0.65: missed
        _row(4096, 64, 64, 2, 15.0, mode="column"),  # K2/K1 1.15: met
        _row(4096, 64, 8, 2, 9.6),  # K2/K1 1.60: missed
        _row(4096, 1024, 64, 1, 17.0, base_us=48.0, bound_ratio=1.2),  # prefill met
        _row(4096, 4096, 64, 1, 41.0, base_us=180.0, bound_ratio=1.6),  # prefill missed
        _row(4096, 16, 32, 2, 9.0, mode="column"),  # K=2 without a K=1 row: not counted
    ]
    got = goals_summary(rows)
    assert got["case"] == "kernels_goals"
    assert (got["decode"]["rows"], got["decode"]["met"]) == (2, 1)
    assert got["decode"]["misses"] == [
        {"out": 4096, "tokens": 64, "adapters": 64, "mode": "plan", "value": 0.65}
    ]
    assert (got["prefill"]["rows"], got["prefill"]["met"]) == (2, 1)
    assert got["prefill"]["misses"][0]["tokens"] == 4096
    assert (got["k2_over_k1"]["rows"], got["k2_over_k1"]["met"]) == (2, 1)
    assert got["k2_over_k1"]["misses"][0]["value"] == 1.6


def test_a_row_whose_base_replays_were_disturbed_is_listed_not_counted() -> None:
    """Rows of a run on the H100 (nineteenth pass): one row's base graph replayed at 191 us
    against 24 for the other rows of its projection and token count, and its marginal rose
    from about 5 to 8.8 us with it; a K=2 row's base replayed at 81 us against 50, its
    marginal fell below its K=1 row's. Neither counts; the other ratios take the median base."""
    rows = [
        _row(4096, 16, 1, 1, 8.8, base_us=191.5),
        _row(4096, 16, 8, 1, 12.5, base_us=23.9),  # 12.5 / 24.0 (the median): missed
        _row(4096, 16, 16, 1, 7.1, base_us=24.0),
        _row(11008, 256, 8, 1, 8.4, base_us=49.3),
        _row(11008, 256, 8, 2, 7.6, base_us=81.4),
        _row(11008, 256, 64, 1, 19.9, base_us=49.6),
    ]
    got = goals_summary(rows)
    decode = got["decode"]
    assert (decode["rows"], decode["met"]) == (4, 3)
    assert decode["misses"][0]["adapters"] == 8 and decode["misses"][0]["value"] == 0.521
    assert [(v["tokens"], v["adapters"]) for v in decode["disturbed"]] == [(16, 1)]
    pair = got["k2_over_k1"]
    assert (pair["rows"], pair["met"], pair["misses"]) == (0, 0, [])
    assert pair["disturbed"][0]["value"] == 0.905
