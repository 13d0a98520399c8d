"""The SDK's request builders turn friendly arguments into the typed contract."""

from __future__ import annotations

import pytest

from loraserve import requests as rq
from loraserve.api.v1 import common_pb2
from loraserve.errors import InvalidArgument


def test_plan_from_pairs_defaults_strategy_by_size():
    single = rq.to_plan([("a", 1.0)])
    assert single.strategy == common_pb2.COMPOSITION_STRATEGY_SELECTION
    mix = rq.to_plan([("a", 0.7), ("b", 0.3)])
    assert mix.strategy == common_pb2.COMPOSITION_STRATEGY_MIXTURE
    assert [(a.adapter_id, round(a.weight, 2)) for a in mix.adapters] == [("a", 0.7), ("b", 0.3)]
    assert rq.to_plan(None) is None
    assert (
        rq.to_plan([("a", 1), ("b", 1)], "fusion").strategy
        == common_pb2.COMPOSITION_STRATEGY_FUSION
    )


def test_unknown_strategy_is_invalid_argument():
    with pytest.raises(InvalidArgument) as err:
        rq.to_plan([("a", 1.0)], "blend")
    assert err.value.violations[0].field == "strategy"


def test_sampling_seed_presence():
    assert not rq.sampling().HasField("seed")
    assert rq.sampling(seed=0).HasField("seed")


def test_push_header_reads_sample_inputs_file(tmp_path):
    (tmp_path / "sample_inputs.json").write_text('["a", "b"]')
    head = rq.push_header(tmp_path, "x", "base", tags=["t"])
    assert list(head.sample_inputs) == ["a", "b"] and list(head.tags) == ["t"]
