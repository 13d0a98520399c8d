"""Launch-config files: schema of every JSON in kernels/configs, lookup rules, fallback."""

from __future__ import annotations

import json

import pytest

from kernels.config import (
    CONFIG_DIR,
    _lookup,
    _pick,
    beside_rules,
    block_m_for,
    block_m_in,
    kernel_config,
    load_config,
    triton_gemm_beside,
)

FILES = sorted(CONFIG_DIR.glob("*.json"))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_config_file_schema(path) -> None:
    cfg = json.loads(path.read_text())
    assert all(_pow2(bm) and bm >= 16 for _, bm in cfg["block_m"])
    assert all(_pow2(bm) and bm >= 16 for _, bm in cfg.get("block_m_multi", []))
    for e in cfg["shrink"]:
        assert _pow2(e["BLOCK_K"]) and e["BLOCK_K"] >= 16 and e["SPLIT_K"] >= 1
        assert _pow2(e["num_warps"]) and e["num_stages"] >= 1 and e["max_tokens"] >= 1
        assert e.get("min_work", 0) >= 0
    for e in cfg["expand"]:
        assert _pow2(e["BLOCK_N"]) and e["BLOCK_N"] >= 16
        assert _pow2(e["num_warps"]) and e["num_stages"] >= 1 and e["max_tokens"] >= 1
        assert e.get("min_work", 0) >= 0
    # where our skinny GEMM runs, its fused entries must cover the token counts
    most = max((e["max_tokens"] for e in cfg.get("fused", [])), default=0)
    for entry in cfg.get("beside_triton_gemm_tokens", []):
        lo, hi, *max_out = entry
        assert 1 <= lo <= hi <= most and len(max_out) <= 1
        assert all(m >= 1 for m in max_out)
    assert cfg.get("fused_max_tokens", {}).get("base", 0) <= most


def test_h100_runs_the_narrow_projections_beside_our_gemm_at_every_decode_size() -> None:
    """o and down (4096 out) beside our GEMM at 1-64 tokens; qkv and gate/up only at 1 and
    48-64 (docs/benchmarks.md, twelfth pass); nothing past 64 tokens or without a GPU config."""
    rules = beside_rules(load_config("NVIDIA_H100_80GB_HBM3"))
    for t in (1, 8, 32, 47, 48, 64):
        assert triton_gemm_beside(rules, t, 4096)
    assert [t for t in (1, 8, 32, 47, 48, 64) if triton_gemm_beside(rules, t, 12288)] == [1, 48, 64]
    assert not triton_gemm_beside(rules, 65, 4096) and not triton_gemm_beside(rules, 128, 22016)
    assert beside_rules(load_config("default")) == []


def test_lookup_takes_smallest_bucket_then_nearest_dim() -> None:
    entries = [
        {"max_tokens": 16, "dim": 4096, "v": 1},
        {"max_tokens": 16, "dim": 11008, "v": 2},
        {"max_tokens": 256, "dim": 4096, "v": 3},
    ]
    assert _pick(entries, 1, 4096)["v"] == 1
    assert _pick(entries, 16, 14336)["v"] == 2
    assert _pick(entries, 17, 11008)["v"] == 3
    assert _pick(entries, 10_000, 4096)["v"] == 3  # past the last bucket: the largest


def test_shrink_entries_with_min_work_apply_from_that_much_work() -> None:
    """Within the nearest size, the entry with the most min_work that fits wins; an entry of
    another bucket or size never does."""
    entries = [
        {"max_tokens": 64, "dim": 4096, "v": "few"},
        {"max_tokens": 64, "dim": 4096, "min_work": 48, "v": "many"},
        {"max_tokens": 64, "dim": 4096, "min_work": 200, "v": "lots"},
        {"max_tokens": 64, "dim": 11008, "min_work": 1, "v": "other dim"},
        {"max_tokens": 256, "dim": 4096, "min_work": 1, "v": "other bucket"},
    ]
    assert _pick(entries, 64, 4096)["v"] == "few"  # work 0: no min_work entry applies
    assert _pick(entries, 64, 4096, work=47)["v"] == "few"
    assert _pick(entries, 64, 4096, work=48)["v"] == "many"
    assert _pick(entries, 33, 4096, work=199)["v"] == "many"
    assert _pick(entries, 64, 4096, work=10_000)["v"] == "lots"
    assert _pick(entries, 64, 11008, work=0)["v"] == "few"  # the only entry that fits


def test_h100_wide_shrink_entries_are_found_by_work() -> None:
    """The tuned file's min_work entries (kernels.tune) come back for that much work, without
    their keys, and the bucket's own entry for less."""
    name = "NVIDIA_H100_80GB_HBM3"
    wide = [e for e in load_config(name)["shrink"] if "min_work" in e]
    assert wide, "kernels.tune wrote no min_work entry"
    for e in wide:
        params = {k: v for k, v in e.items() if k not in ("max_tokens", "dim", "min_work")}
        assert _lookup(name, "shrink", e["max_tokens"], e["dim"], None, e["min_work"]) == params
        assert _lookup(name, "shrink", e["max_tokens"], e["dim"], None, 0) != params


def test_fused_entries_are_picked_by_out_and_in() -> None:
    """o (4096 -> 4096) and down (11008 -> 4096) share out; their fused GEMMs differ by in."""
    entries = [
        {"max_tokens": 64, "dim": 4096, "in": 4096, "v": "o"},
        {"max_tokens": 64, "dim": 4096, "in": 11008, "v": "down"},
        {"max_tokens": 64, "dim": 12288, "in": 4096, "v": "qkv"},
    ]
    assert _pick(entries, 32, 4096, 4096)["v"] == "o"
    assert _pick(entries, 32, 4096, 11008)["v"] == "down"
    assert _pick(entries, 32, 12288, 4096)["v"] == "qkv"
    for gpu in ("default", "NVIDIA_H100_80GB_HBM3"):
        cfg = load_config(gpu)
        for e in cfg["fused"]:
            assert _pow2(e["BLOCK_N"]) and _pow2(e["BLOCK_K"]) and e["in"] >= 16
        assert kernel_config("fused", 7, 4096, "cpu", 4096).keys() >= {"BLOCK_N", "BLOCK_K"}


def test_cpu_and_unknown_gpus_use_the_default_file() -> None:
    assert load_config("No_Such_GPU") == load_config("default")
    cfg = kernel_config("shrink", 7, 4096, "cpu")
    assert {"BLOCK_K", "SPLIT_K", "num_warps", "num_stages"} <= cfg.keys()
    assert "max_tokens" not in cfg
    assert block_m_for(1, "cpu") == 16


def test_plan_tiles_of_several_adapters_take_the_multi_table() -> None:
    """block_m_multi applies to plan tiles of K > 1 adapters only; without it, block_m."""
    cfg = {"block_m": [[256, 16], [4096, 32]], "block_m_multi": [[4096, 16]]}
    assert block_m_in(cfg, 1024, 1) == 32
    assert block_m_in(cfg, 1024, 2) == 16
    assert block_m_in({"block_m": cfg["block_m"]}, 1024, 2) == 32
    h100 = load_config("NVIDIA_H100_80GB_HBM3")
    assert block_m_in(h100, 4096, 2) == 16 and block_m_in(h100, 4096, 1) == 32


def test_expand_entries_are_found_by_adapters_per_tile() -> None:
    """The H100 file's expand min_work entries: tiles of 2-3 adapters at 16-256 tokens take
    BLOCK_N 256 with 4 warps, tiles of 4 (the engine's K=4 graphs) and of 1 keep 512/8."""
    name = "NVIDIA_H100_80GB_HBM3"
    for k, block_n in ((1, 512), (2, 256), (3, 256), (4, 512)):
        assert _lookup(name, "expand", 64, 11008, None, k)["BLOCK_N"] == block_n
    assert _lookup(name, "expand", 1024, 4096, None, 2)["BLOCK_N"] == 256
