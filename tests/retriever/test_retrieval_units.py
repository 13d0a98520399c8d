"""Pure parts of the retriever: scoring modes, plans and weights, replica choice, batching."""

from __future__ import annotations

import math
import random

import pytest
import torch

from loraserve.api.v1 import common_pb2
from retriever_svc.finetune import DomainTerm, domain_loss, make_batches
from retriever_svc.heldout import split_samples
from retriever_svc.plans import PlanOptions, Weighting, build_plan, mixture_weights
from retriever_svc.routing import ReplicaStats, choose_replica
from retriever_svc.scoring import Mode, Scored, rank
from retriever_svc.search import Hits

S = common_pb2.CompositionStrategy


def hits() -> Hits:
    # a: best centroid, weak samples; b: weaker centroid, one very close sample; c: only in
    # the sample list; the sample list was truncated at 0.30.
    return Hits(
        centroid={"a": 0.80, "b": 0.70},
        samples={"a": [0.60, 0.55], "b": [0.95, 0.40], "c": [0.50]},
        versions={"a": 1, "b": 2, "c": 1},
        domains={"a": "nli", "b": "qa", "c": "qa"},
        centroid_tail=0.65,
        sample_tail=0.30,
    )


SCORING_CASES = [
    (Mode.CENTROID, 1, ["a", "b"], [0.80, 0.70]),
    (Mode.NEAREST_SAMPLE, 1, ["b", "a", "c"], [0.95, 0.60, 0.50]),
    (Mode.NEAREST_SAMPLE, 2, ["b", "a", "c"], [0.675, 0.575, 0.40]),
    (Mode.COMBINED, 1, ["b", "a", "c"], [0.775, 0.74, 0.605]),
]


@pytest.mark.parametrize(("mode", "m", "order", "scores"), SCORING_CASES)
def test_scoring_modes(mode: Mode, m: int, order: list[str], scores: list[float]) -> None:
    ranked = rank(hits(), mode, centroid_weight=0.7, nearest=m)
    assert [r.adapter_id for r in ranked] == order
    assert [round(r.score, 4) for r in ranked] == pytest.approx(scores)
    by_id = {r.adapter_id: r for r in ranked}
    assert by_id["a"].version == 1 and by_id["b"].domain == "qa"
    if mode is not Mode.CENTROID:
        # c is missing from the truncated centroid list: its bound is the list's tail
        assert by_id["c"].centroid_score == pytest.approx(0.65)


def scored(*scores: float) -> list[Scored]:
    return [Scored(f"a{i}", 1, s, s, 0.0, "") for i, s in enumerate(scores)]


def opts(strategy: int, k: int = 3, weighting=Weighting.SOFTMAX, t: float = 0.05, min_score=0.3):
    return PlanOptions(strategy, k, weighting, t, min_score, gate_id="g1")


def test_plans_per_strategy() -> None:
    ranked = scored(0.62, 0.55, 0.21)
    plan, below = build_plan(ranked, opts(S.COMPOSITION_STRATEGY_SELECTION))
    assert not below and [(a.adapter_id, a.weight) for a in plan.adapters] == [("a0", 1.0)]

    plan, _ = build_plan(ranked, opts(S.COMPOSITION_STRATEGY_MIXTURE))
    # a2 is under min_score; softmax([0.62, 0.55] / 0.05) = [0.802, 0.198]
    assert [a.adapter_id for a in plan.adapters] == ["a0", "a1"]
    assert [a.weight for a in plan.adapters] == pytest.approx([0.8022, 0.1978], abs=1e-4)
    assert plan.strategy == S.COMPOSITION_STRATEGY_MIXTURE and plan.gate_id == ""

    plan, _ = build_plan(ranked, opts(S.COMPOSITION_STRATEGY_FUSION, weighting=Weighting.UNIFORM))
    assert [a.weight for a in plan.adapters] == pytest.approx([0.5, 0.5])

    plan, _ = build_plan(ranked, opts(S.COMPOSITION_STRATEGY_GATE, min_score=-1.0))
    assert plan.gate_id == "g1" and len(plan.adapters) == 3
    assert sum(a.weight for a in plan.adapters) == pytest.approx(1.0)


def test_below_min_score_is_the_base_model() -> None:
    for ranked in (scored(0.2, 0.1), []):
        plan, below = build_plan(ranked, opts(S.COMPOSITION_STRATEGY_MIXTURE, min_score=0.25))
        assert below and len(plan.adapters) == 0


def test_mixture_weights() -> None:
    assert mixture_weights([], Weighting.SOFTMAX, 0.1) == []
    assert mixture_weights([0.3, 0.9, 0.1], Weighting.UNIFORM, 0.1) == pytest.approx([1 / 3] * 3)
    w = mixture_weights([1000.0, 999.0], Weighting.SOFTMAX, 0.01)  # no overflow
    assert all(math.isfinite(x) for x in w) and w[0] > 0.99


def replica(
    addr: str, load: int, resident: set[tuple[str, int]] = frozenset(), merged: str = ""
) -> ReplicaStats:
    return ReplicaStats(addr, addr, "tiny", load, 0, frozenset(resident), merged)


def plan_of(*ids: str) -> common_pb2.LoraPlan:
    return common_pb2.LoraPlan(
        strategy=S.COMPOSITION_STRATEGY_MIXTURE,
        adapters=[common_pb2.WeightedAdapter(adapter_id=i, weight=1.0) for i in ids],
    )


ROUTE_CASES = [
    # (replicas, plan adapters, expected address, reason starts with)
    ([replica("r1", 3), replica("r2", 1)], (), "r2", "least loaded"),
    ([replica("r1", 3, {("a", 1)}), replica("r2", 0)], ("a",), "r1", "adapters resident"),
    (
        [replica("r1", 2, {("a", 1)}), replica("r2", 2, {("a", 1), ("b", 1)})],
        ("a", "b"),
        "r2",
        "adapters resident",
    ),
    (
        [replica("r1", 1, {("a", 1)}), replica("r2", 0, {("b", 1)})],
        ("a", "b"),
        "r2",
        "adapters partly",
    ),
    ([replica("r1", 20, {("a", 1)}), replica("r2", 2)], ("a",), "r2", "least loaded"),  # overload
    ([replica("r2", 0), replica("r1", 0)], (), "r1", "least loaded"),  # deterministic tie-break
    # dLoRA merged mode: the replica with the plan's adapter merged wins a residency tie, even
    # under more load; a replica with another adapter merged loses one.
    (
        [replica("r1", 1, {("a", 1)}), replica("r2", 3, {("a", 1)}, merged="a")],
        ("a",),
        "r2",
        "adapter merged",
    ),
    ([replica("r1", 0, merged="a"), replica("r2", 2)], (), "r2", "no other adapter merged"),
    (
        [replica("r1", 0, {("b", 1)}, merged="a"), replica("r2", 1, {("b", 1)})],
        ("b",),
        "r2",
        "adapters resident",
    ),
    ([replica("r1", 0, merged="a"), replica("r2", 12)], (), "r1", "least loaded"),  # overload
]


@pytest.mark.parametrize(("replicas", "ids", "address", "reason"), ROUTE_CASES)
def test_choose_replica(replicas, ids, address: str, reason: str) -> None:
    choice = choose_replica(replicas, plan_of(*ids), slack=8)
    assert choice.replica.address == address
    assert choice.reason.startswith(reason), choice.reason


def test_contrastive_batches_hold_each_adapter_once() -> None:
    groups = {f"t{i}": [f"t{i}-s{j}" for j in range(5 + i % 3)] for i in range(10)}
    groups["single"] = ["only one"]
    batches = make_batches(groups, batch_size=4, rng=random.Random(0))
    anchors = [a for b in batches for _, a, _ in b]
    assert sorted(anchors) == sorted(t for ts in groups.values() for t in ts)  # each once
    for batch in batches:
        owners = [key for key, _, _ in batch]
        assert len(owners) == len(set(owners)) and 2 <= len(batch) <= 4
        for key, a, p in batch:
            assert a in groups[key] and p in groups[key]
            assert a != p or a == "only one"


def test_heldout_split() -> None:
    pool = {"a": [f"a{i}" for i in range(20)], "b": ["b0", "b1"], "c": ["c0"]}
    split = split_samples(pool, 0.2, seed=1)
    assert len(split.held["a"]) == 4 and len(split.train["a"]) == 16
    assert len(split.held["b"]) == 0 or len(split.train["b"]) == 1
    assert split.held["c"] == [] and split.train["c"] == ["c0"]
    assert not set(split.held["a"]) & set(split.train["a"])
    assert split_samples(pool, 0.2, seed=1).held == split.held  # seeded


def _domain_loss_loop(sim: list[list[float]], domains: list[str], leave_own_out: bool) -> float:
    """The module docstring's D(S), written as the loop."""
    total, rows = 0.0, 0
    for i, row in enumerate(sim):
        cols = [j for j in range(len(row)) if not (leave_own_out and j == i)]
        pos = [j for j in cols if j == i or (domains[i] and domains[j] == domains[i])]
        if leave_own_out and not pos:
            continue
        total -= math.log(sum(math.exp(row[j]) for j in pos) / sum(math.exp(row[j]) for j in cols))
        rows += 1
    return total / rows if rows else 0.0


# a0 and a1 share a domain but a0's sample sits nearer a2 (another domain): WITH_OWN is
# satisfied by a0's own column, LEAVE_OWN_OUT is not. a2 and a3 have no peer in the batch.
SIM = [[9.0, 1.0, 4.0, 0.0], [2.0, 8.0, 1.0, 0.5], [3.0, 0.0, 7.0, 6.0], [0.0, 1.0, 2.0, 5.0]]
DOMAINS = ["nli", "nli", "qa", ""]
DOMAIN_LOSS_CASES = [
    (SIM, DOMAINS, DomainTerm.WITH_OWN),
    (SIM, DOMAINS, DomainTerm.LEAVE_OWN_OUT),
    (SIM, ["a", "b", "c", ""], DomainTerm.LEAVE_OWN_OUT),  # no shared domain: 0
    (SIM, ["", "", "", ""], DomainTerm.WITH_OWN),  # only the own column: the task CE
]


@pytest.mark.parametrize(("sim", "domains", "term"), DOMAIN_LOSS_CASES)
def test_domain_loss_matches_the_loop(sim, domains, term: DomainTerm) -> None:
    t = torch.tensor(sim, requires_grad=True)
    got = domain_loss(t, domains, term)
    want = _domain_loss_loop(sim, domains, term is DomainTerm.LEAVE_OWN_OUT)
    value = float(got.detach())
    assert value == pytest.approx(want, rel=1e-5), (value, want)
    if got.requires_grad:  # the masked own column must not turn gradients into NaN
        got.backward()
        assert torch.isfinite(t.grad).all()


def test_leave_own_out_asks_for_a_same_domain_runner_up() -> None:
    t = torch.tensor(SIM)
    with_own = float(domain_loss(t, DOMAINS, DomainTerm.WITH_OWN))
    leave_out = float(domain_loss(t, DOMAINS, DomainTerm.LEAVE_OWN_OUT))
    # rows a0, a1: -log(e^1 / (e^1 + e^4 + e^0)) and -log(e^2 / (e^2 + e^1 + e^0.5)), averaged
    assert leave_out == pytest.approx(1.7651, abs=1e-4)
    assert with_own < 0.2 < 1.5 < leave_out
