"""Fusion is exact (fused delta == weighted sum of deltas); plans and local sources."""

from __future__ import annotations

import pytest
import torch

from executor_svc.adapters.fusion import fuse
from executor_svc.adapters.host_cache import HostCache
from executor_svc.adapters.local_source import ChainSource, LocalDirSource
from executor_svc.adapters.plans import check_plan, resolve_plan
from executor_svc.adapters.refs import AdapterKey, FusionKey
from executor_svc.adapters.store import AdapterStore
from executor_svc.model.lora_loader import load_adapter
from loraserve.api.v1 import common_pb2
from loraserve.errors import InvalidArgument, NotFound

S = common_pb2.CompositionStrategy


def delta(m) -> torch.Tensor:
    return m.scale * (m.b.double() @ m.a.double())


def test_fused_delta_is_the_weighted_sum_of_deltas(adapter_factory):
    # Different ranks, alphas, rsLoRA and target modules: every module's scale differs.
    a = load_adapter(adapter_factory("fa", rank=4, alpha=8, seed=1))
    b = load_adapter(
        adapter_factory(
            "fb", rank=2, alpha=6, use_rslora=True, seed=2, target_modules=["q_proj", "down_proj"]
        )
    )
    c = load_adapter(adapter_factory("fc", rank=3, alpha=3, rank_pattern={"v_proj": 1}, seed=3))
    weights = [0.5, 0.3, 0.2]
    fused = fuse(list(zip([a, b, c], weights, strict=True)), max_rank=16)
    worst = 0.0
    for layer, modules in fused.items():
        for name, m in modules.items():
            want = sum(
                w * delta(x[layer][name])
                for x, w in zip([a, b, c], weights, strict=True)
                if name in x.get(layer, {})
            )
            assert m.scale == 1.0
            worst = max(worst, (delta(m) - want).abs().max().item())
    assert worst < 1e-6, worst
    assert fused[0]["q_proj"].a.shape[0] == 4 + 2 + 3
    assert fused[0]["v_proj"].a.shape[0] == 4 + 1  # b lacks v_proj; c's rank_pattern gives 1


def test_fusion_skips_zero_weights_and_refuses_rank_overflow(adapter_factory):
    a = load_adapter(adapter_factory("za", rank=8, seed=1))
    b = load_adapter(adapter_factory("zb", rank=8, seed=2))
    assert fuse([(a, 1.0), (b, 0.0)], max_rank=8)[0]["q_proj"].a.shape[0] == 8
    with pytest.raises(InvalidArgument) as info:
        fuse([(a, 0.5), (b, 0.5)], max_rank=8)
    assert info.value.violations[0].field == "plan.adapters"


def p(*items, strategy=0):
    return common_pb2.LoraPlan(
        strategy=strategy,
        adapters=[
            common_pb2.WeightedAdapter(adapter_id=a, version=v, weight=w) for a, v, w in items
        ],
    )


def test_check_plan_collects_every_violation():
    bad = check_plan(
        p(
            ("", 0, 1.0),
            ("x", 0, -1.0),
            ("x", 0, float("nan")),
            strategy=S.COMPOSITION_STRATEGY_MIXTURE,
        )
    )
    fields = [v.field for v in bad]
    assert fields == [
        "plan.adapters[0].adapter_id",
        "plan.adapters[1].weight",
        "plan.adapters[2].adapter_id",
        "plan.adapters[2].weight",
    ]
    assert check_plan(p(*[(f"a{i}", 0, 1.0) for i in range(9)], strategy=3)) == []  # fusion: any k


async def test_resolve_plan_shapes(adapter_factory, tmp_path):
    for name in ("r1", "r2"):
        adapter_factory(name, rank=2)
    # A second version of r1 in the <id>/<N>/ layout; version 0 resolves to it.
    adapter_factory("r1/2", rank=2, seed=9)
    store = AdapterStore(
        LocalDirSource(tmp_path / "adapters"), HostCache(1 << 20), load_adapter, max_rank=16
    )
    assert (await resolve_plan(p(), store)).keys == []
    single = await resolve_plan(p(("r1", 0, 0.0)), store)
    assert single.keys == [AdapterKey("r1", 2)] and single.weights == [1.0]
    mix = await resolve_plan(
        p(("r1", 1, 0.0), ("r2", 0, 0.0), strategy=S.COMPOSITION_STRATEGY_MIXTURE), store
    )
    assert mix.keys == [AdapterKey("r1", 1), AdapterKey("r2", 1)]
    assert mix.weights == [0.5, 0.5]  # all-zero weights: uniform
    fused = await resolve_plan(
        p(("r1", 0, 0.25), ("r2", 0, 0.75), strategy=S.COMPOSITION_STRATEGY_FUSION), store
    )
    assert fused.keys == [FusionKey(((AdapterKey("r1", 2), 0.25), (AdapterKey("r2", 1), 0.75)))]
    with pytest.raises(NotFound):
        await resolve_plan(p(("r3", 0, 1.0)), store)


async def test_chain_source_falls_through_not_found(adapter_factory, tmp_path):
    adapter_factory("only-here", rank=2)
    empty = LocalDirSource(tmp_path / "nothing")
    chain = ChainSource([empty, LocalDirSource(tmp_path / "adapters")])
    resolved = await chain.resolve("only-here", 0)
    assert resolved.key == AdapterKey("only-here", 1) and resolved.size_bytes > 0
    assert (await chain.fetch(resolved)).name == "only-here"
    for bad in ("../adapters", "a/b", ""):
        with pytest.raises(NotFound):
            await chain.resolve(bad, 0)
