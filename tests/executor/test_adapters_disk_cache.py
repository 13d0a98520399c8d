"""The adapter disk cache's LRU eviction, on real files (blobs + hard-linked adapter dirs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from executor_svc.adapters.disk_cache import disk_usage, evict_lru

NOW = 1_000_000.0
CONFIG = b"{" + b" " * 98 + b"}"  # 100 bytes, the same file in every adapter: one blob


def make_cache(root: Path, ages: dict[str, float], weights: int = 1000) -> Path:
    """adapters/<name>/ with a shared adapter_config.json and its own weights, aged as given
    (seconds before NOW); blobs/ holds each distinct file once."""
    blobs, adapters = root / "blobs", root / "adapters"
    blobs.mkdir(parents=True)
    adapters.mkdir()
    (blobs / "config").write_bytes(CONFIG)
    for name, age in ages.items():
        (blobs / f"w-{name}").write_bytes(name.encode() * weights)
        d = adapters / name
        d.mkdir()
        os.link(blobs / "config", d / "adapter_config.json")
        os.link(blobs / f"w-{name}", d / "adapter_model.safetensors")
        os.utime(d, (NOW - age, NOW - age))
    return root


def test_disk_usage_counts_hard_links_once(tmp_path):
    cache = make_cache(tmp_path, {"a": 30, "b": 20})
    assert disk_usage(cache) == 100 + 2 * 1000


# (budget, ages of a/b/c in seconds, min_age_s, adapters left, blobs left besides config)
CASES = [
    pytest.param(2200, {"a": 900, "b": 800, "c": 700}, 60, {"b", "c"}, {"w-b", "w-c"}, id="lru"),
    pytest.param(1200, {"a": 900, "b": 800, "c": 700}, 60, {"c"}, {"w-c"}, id="two-evicted"),
    pytest.param(10**9, {"a": 900, "b": 800, "c": 700}, 60, {"a", "b", "c"}, None, id="fits"),
    pytest.param(2200, {"a": 30, "b": 800, "c": 700}, 60, {"a", "c"}, {"w-a", "w-c"}, id="young"),
    pytest.param(100, {"a": 10, "b": 20, "c": 30}, 60, {"a", "b", "c"}, None, id="all-young"),
]


@pytest.mark.parametrize(("budget", "ages", "min_age", "left", "blobs_left"), CASES)
def test_evicts_least_recently_used_first(tmp_path, budget, ages, min_age, left, blobs_left):
    cache = make_cache(tmp_path, ages)
    result = evict_lru(cache, budget, min_age_s=min_age, now=NOW)
    assert {d.name for d in (cache / "adapters").iterdir()} == left
    names = {p.name for p in (cache / "blobs").iterdir()}
    assert "config" in names, "a blob another adapter still links was removed"
    if blobs_left is not None:
        assert names - {"config"} == blobs_left
    assert result.bytes_after == disk_usage(cache)
    assert sorted(result.removed) == sorted(set(ages) - left)
    for d in (cache / "adapters").iterdir():  # survivors are whole
        assert (d / "adapter_config.json").read_bytes() == CONFIG


def test_keeps_the_adapter_just_fetched_even_over_budget(tmp_path):
    cache = make_cache(tmp_path, {"a": 900, "b": 0})
    result = evict_lru(cache, 1, keep=cache / "adapters" / "b", min_age_s=0, now=NOW)
    assert [d.name for d in (cache / "adapters").iterdir()] == ["b"]
    assert result.removed == ["a"] and result.bytes_after == 1100


def test_orphan_blobs_go_last_and_only_when_old(tmp_path):
    cache = make_cache(tmp_path, {"a": 900})
    old, young = cache / "blobs" / "orphan-old", cache / "blobs" / "orphan-young"
    old.write_bytes(b"x" * 500)
    young.write_bytes(b"y" * 500)
    os.utime(old, (NOW - 900, NOW - 900))
    os.utime(young, (NOW - 5, NOW - 5))
    result = evict_lru(cache, 1200, keep=cache / "adapters" / "a", min_age_s=60, now=NOW)
    assert not old.exists() and young.exists()
    assert result.orphan_blobs == 1 and result.removed == []
    assert (cache / "adapters" / "a").is_dir()


def test_empty_or_missing_cache(tmp_path):
    assert evict_lru(tmp_path / "nothing", 1).removed == []
    (tmp_path / "c").mkdir()
    assert evict_lru(tmp_path / "c", 1).bytes_after == 0
