"""Launch-config files: schema of every JSON in kernels/configs, lookup rules, fallback."""

from __future__ import annotations

import json

import pytest
import torch

from kernels.config import (
    CONFIG_DIR,
    _lookup,
    _pick,
    beside_rules,
    block_m_for,
    block_m_in,
    kernel_config,
    launch_params,
    load_config,
    triton_gemm_beside,
)

FILES = sorted(CONFIG_DIR.glob("*.json"))
H100 = "NVIDIA_H100_80GB_HBM3"


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
        assert e.get("min_work", 0) >= 0 and e.get("mode", "plan") in ("plan", "column")
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
    wide = [e for e in load_config(name)["shrink"] if "min_work" in e and "mode" not in e]
    assert wide, "kernels.tune wrote no min_work entry"
    for e in wide:
        params = launch_params(e)
        assert _lookup(name, "shrink", e["max_tokens"], e["dim"], None, e["min_work"]) == params
        assert _lookup(name, "shrink", e["max_tokens"], e["dim"], None, 0) != params


def test_shrink_entries_with_a_mode_apply_to_that_mode_only_and_win() -> None:
    entries = [
        {"max_tokens": 1024, "dim": 4096, "v": "own"},
        {"max_tokens": 1024, "dim": 4096, "min_work": 100, "v": "wide"},
        {"max_tokens": 1024, "dim": 4096, "min_work": 128, "mode": "column", "v": "column"},
        {"max_tokens": 4096, "dim": 4096, "mode": "column", "v": "other bucket"},
    ]
    assert _pick(entries, 1024, 4096, work=128)["v"] == "wide"  # mode unknown: none of them
    assert _pick(entries, 1024, 4096, work=128, mode="plan")["v"] == "wide"
    assert _pick(entries, 1024, 4096, work=128, mode="column")["v"] == "column"
    assert _pick(entries, 1024, 4096, work=10_000, mode="column")["v"] == "column"
    assert _pick(entries, 1024, 4096, work=127, mode="column")["v"] == "wide"  # too little work
    assert _pick(entries, 1024, 4096, work=0, mode="column")["v"] == "own"


def test_h100_column_shrink_entries_are_found_by_mode_and_work() -> None:
    """The tuned file's column entries (kernels.tune --column-only) come back for column
    launches of that much work, never for plan-mode launches; the fused path's lookup, which
    gives no mode, never sees them."""
    name = "NVIDIA_H100_80GB_HBM3"
    column = [e for e in load_config(name)["shrink"] if e.get("mode") == "column"]
    assert column, "kernels.tune wrote no column entry"
    for e in column:
        params, t, work = launch_params(e), e["max_tokens"], e["min_work"]
        assert _lookup(name, "shrink", t, e["dim"], None, work, "column") == params
        assert _lookup(name, "shrink", t, e["dim"], None, work, "plan") != params
        assert _lookup(name, "shrink", t, e["dim"], None, work) != params
        assert _lookup(name, "shrink", t, e["dim"], None, work - 1, "column") != params


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


def test_the_shrink_asks_for_its_launch_mode(monkeypatch) -> None:
    """Under the H100's file (on CPU tensors, launches recorded, not run): a column-mode top-2
    step over 64 adapters at 1,024 tokens takes the column entry, a K=1 step of as many tiles
    the bucket's own entry."""
    import kernels.config as config_module
    from kernels import build_lora_meta, lora_shrink
    from kernels._bench import make_problem
    from kernels._launch import Launcher

    monkeypatch.setattr(config_module, "gpu_config_name", lambda device=None: H100)
    launches = []
    monkeypatch.setattr(Launcher, "__call__", lambda self, *a: launches.append(a))
    column = [e for e in load_config(H100)["shrink"] if e.get("mode") == "column"]
    entry = next(e for e in column if e["max_tokens"] == 1024)
    for k, mode in ((2, "column"), (1, None)):
        p = make_problem(1024, 4096, 4096, adapters=64, k=k, device="cpu")
        meta = build_lora_meta(p.slots, p.weights, 64, torch.device("cpu"), mode=mode)
        lora_shrink(p.x, [p.a], p.ranks, meta)
    (col_grid, *_, col_cx, _), (one_grid, *_, one_cx, _) = launches
    assert col_cx["BLOCK_K"] == entry["BLOCK_K"] and col_grid[1] == entry["SPLIT_K"]
    own = load_config(H100)["shrink"]
    own = next(e for e in own if e["max_tokens"] == 1024 and "min_work" not in e)
    assert one_cx["BLOCK_K"] == own["BLOCK_K"] and one_grid[1] == own["SPLIT_K"]
    assert (col_cx["BLOCK_K"], col_grid[1]) != (one_cx["BLOCK_K"], one_grid[1])


def test_the_tuner_replaces_one_kind_of_shrink_entry_and_keeps_the_other() -> None:
    """``--wide-only`` must keep the column entries (they carry min_work too) and
    ``--column-only`` the wide ones."""
    from kernels.tune import merged_shrink

    own = {"max_tokens": 64, "dim": 4096, "SPLIT_K": 32}
    wide = {"max_tokens": 64, "dim": 4096, "min_work": 48, "SPLIT_K": 4}
    column = {"max_tokens": 1024, "dim": 4096, "min_work": 128, "mode": "column", "SPLIT_K": 4}
    new_wide = {**wide, "min_work": 40}
    new_column = {**column, "SPLIT_K": 2}
    entries = [own, wide, column]
    assert merged_shrink(entries, wide=[new_wide]) == [own, column, new_wide]
    assert merged_shrink(entries, column=[new_column]) == [own, wide, new_column]
    assert merged_shrink(entries, wide=[], column=[]) == [own]
    assert merged_shrink(entries) == entries


def test_token_buckets_include_the_fused_gemms_entries(monkeypatch) -> None:
    """The engine's warm-up launches each bucket once before serving: the fused GEMM's
    entries (whose BLOCK_M follows the token count's power of two) are buckets too, or steps
    of 17-32 tokens compiled it while serving (docs/benchmarks.md, twenty-second pass)."""
    import kernels.config as config_module

    monkeypatch.setattr(config_module, "gpu_config_name", lambda device=None: H100)
    fused = {e["max_tokens"] for e in load_config(H100)["fused"]}
    assert fused == {16, 32, 64}
    assert fused <= set(config_module.token_buckets("cuda"))
