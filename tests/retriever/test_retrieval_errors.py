"""Bad input and unavailable dependencies: precise status codes with google.rpc details."""

from __future__ import annotations

import grpc
import pytest
from retriever_fixtures import BASE, retriever_stack

from loraserve.api.v1 import common_pb2, retriever_pb2
from loraserve.errors import parse_rpc_error

S = common_pb2.CompositionStrategy
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def rr(**kw) -> retriever_pb2.RetrieveRequest:
    kw.setdefault("prompts", ["Translate to French: hello"])
    kw.setdefault("base_model", BASE)
    return retriever_pb2.RetrieveRequest(**kw)


# (name, request, expected code, field of the violation or a message fragment)
ERROR_CASES = [
    ("no prompts", rr(prompts=[]), INVALID, "prompts"),
    ("too many prompts", rr(prompts=["p"] * 257), INVALID, "prompts"),
    ("empty prompt", rr(prompts=["ok", "  "]), INVALID, "prompts[1]"),
    ("prompt over the hard cap", rr(prompts=["x" * 100_001]), INVALID, "prompts[0]"),
    ("no base model", rr(base_model=""), INVALID, "base_model"),
    (
        "top_k over the cap",
        rr(top_k=65, strategy=S.COMPOSITION_STRATEGY_SELECTION),
        INVALID,
        "top_k",
    ),
    (
        "mixture over the executor's k",
        rr(top_k=5, strategy=S.COMPOSITION_STRATEGY_MIXTURE),
        INVALID,
        "top_k",
    ),
    ("unknown strategy", rr(strategy=9), INVALID, "strategy"),
    ("unknown scoring", rr(scoring=7), INVALID, "scoring"),
    ("unknown weighting", rr(weighting=5), INVALID, "weighting"),
    ("negative temperature", rr(temperature=-1.0), INVALID, "temperature"),
    ("nan min_score", rr(min_score=float("nan")), INVALID, "min_score"),
    (
        "empty allow-list id",
        rr(filter=retriever_pb2.RetrievalFilter(adapter_ids=[""])),
        INVALID,
        "filter.adapter_ids[0]",
    ),
    (
        "gate without a trained gate",
        rr(strategy=S.COMPOSITION_STRATEGY_GATE),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no",
    ),
    (
        "unknown base model",
        rr(base_model="no-such-model"),
        grpc.StatusCode.NOT_FOUND,
        "unknown base model 'no-such-model'",
    ),
]

EXPLAIN_CASES = [
    ("empty prompt", retriever_pb2.ExplainRequest(prompt="", base_model=BASE), INVALID, "prompt"),
    (
        "top_n over the cap",
        retriever_pb2.ExplainRequest(prompt="p", base_model=BASE, top_n=100),
        INVALID,
        "top_n",
    ),
    (
        "unknown base model",
        retriever_pb2.ExplainRequest(prompt="p", base_model="nope"),
        grpc.StatusCode.NOT_FOUND,
        "unknown base model",
    ),
]


async def test_error_cases(tmp_path, tiny_model_dir) -> None:
    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        for name, request, code, where in ERROR_CASES:
            await _expect(st.retriever.Retrieve(request), name, code, where)
        for name, request, code, where in EXPLAIN_CASES:
            await _expect(st.retriever.Explain(request), name, code, where)
        # Several problems at once are all reported.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await st.retriever.Retrieve(rr(prompts=["", "ok"], base_model="", top_k=99))
        fields = {v.field for v in parse_rpc_error(err.value).violations}
        assert fields == {"prompts[0]", "base_model", "top_k"}

        # A registered base model without adapters: plans are the base model, no error.
        resp = await st.retriever.Retrieve(rr(top_k=0))
        assert len(resp.plans) == 1 and resp.plans[0].below_min_score
        assert len(resp.plans[0].plan.adapters) == 0 and resp.embedding_model

        # Route with no executor answering: UNAVAILABLE naming the replica.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await st.retriever.Route(retriever_pb2.RouteRequest(base_model=BASE))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "127.0.0.1:1" in err.value.details()


async def test_truncated_prompts_are_reported(tmp_path, tiny_model_dir) -> None:
    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        long_prompt = "word " * 2000  # far over the model's 256-token window
        resp = await st.retriever.Retrieve(rr(prompts=["short prompt", long_prompt]))
        assert [p.truncated for p in resp.plans] == [False, True]
        explained = await st.retriever.Explain(
            retriever_pb2.ExplainRequest(prompt=long_prompt, base_model=BASE)
        )
        assert explained.truncated


async def _expect(call, name: str, code: grpc.StatusCode, where: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    info = parse_rpc_error(err.value)
    assert info.code == code, f"{name}: {info.code} {info.message}"
    if code == INVALID:
        assert where in {v.field for v in info.violations}, f"{name}: {info.violations}"
    else:
        assert where in info.message, f"{name}: {info.message}"
