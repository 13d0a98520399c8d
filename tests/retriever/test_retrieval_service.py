"""Retrieve / Explain through the real stubs, over adapters ingested by the real registry path."""

from __future__ import annotations

import asyncio
import time

import pytest
from retriever_fixtures import BASE, QUERIES, SAMPLES, Stack, retriever_stack

from loraserve import vectors as V
from loraserve.api.v1 import common_pb2, registry_pb2, retriever_pb2

S = common_pb2.CompositionStrategy
TAGS = {
    "sentiment": ["text", "classify"],
    "translation": ["text", "generate"],
    "arithmetic": ["math"],
    "sql": ["code", "generate"],
    "poetry": ["text", "generate"],
}
DOMAINS = {"sentiment": "nlu", "translation": "nlg", "arithmetic": "math", "sql": "code",
           "poetry": "nlg"}  # fmt: skip


async def push_pool(st: Stack, adapters, tasks=tuple(SAMPLES)) -> None:
    await asyncio.gather(
        *(
            st.push(t, adapters[i], SAMPLES[t], tags=TAGS[t], domain=DOMAINS[t])
            for i, t in enumerate(tasks)
        )
    )


async def retrieve(st: Stack, prompts=None, **kw) -> retriever_pb2.RetrieveResponse:
    return await st.retriever.Retrieve(
        retriever_pb2.RetrieveRequest(
            prompts=list(QUERIES.values()) if prompts is None else prompts,
            base_model=kw.pop("base_model", BASE),
            **kw,
        )
    )


def top1(resp: retriever_pb2.RetrieveResponse) -> list[str]:
    return [p.candidates[0].adapter_id if p.candidates else "" for p in resp.plans]


async def test_plans_and_scores_over_the_registry_pool(tmp_path, tiny_model_dir, tiny_adapters):
    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        await push_pool(st, tiny_adapters)
        resp = await retrieve(st)  # defaults: MIXTURE, k=3, softmax, centroid scoring
        assert top1(resp) == list(QUERIES) and resp.embedding_model
        for i, p in enumerate(resp.plans):
            assert p.prompt_index == i and not p.truncated and not p.below_min_score
            assert p.plan.strategy == S.COMPOSITION_STRATEGY_MIXTURE
            assert 1 <= len(p.plan.adapters) <= 3
            assert sum(a.weight for a in p.plan.adapters) == pytest.approx(1.0, abs=1e-5)
            assert p.plan.adapters[0].adapter_id == p.candidates[0].adapter_id
            scores = [c.score for c in p.candidates]
            assert scores == sorted(scores, reverse=True) and len(scores) == 3
            assert p.candidates[0].version == 1 and p.candidates[0].domain

        uniform = await retrieve(
            st, weighting=retriever_pb2.MIXTURE_WEIGHTING_UNIFORM, min_score=-1.0
        )
        assert all(
            [a.weight for a in p.plan.adapters] == pytest.approx([1 / 3] * 3) for p in uniform.plans
        )
        sel = await retrieve(st, strategy=S.COMPOSITION_STRATEGY_SELECTION)
        assert [[(a.adapter_id, a.weight) for a in p.plan.adapters] for p in sel.plans] == [
            [(t, 1.0)] for t in QUERIES
        ]
        fusion = await retrieve(st, strategy=S.COMPOSITION_STRATEGY_FUSION, top_k=5, min_score=-1)
        assert all(len(p.plan.adapters) == 5 for p in fusion.plans)

        for mode in (
            retriever_pb2.SCORING_MODE_NEAREST_SAMPLE,
            retriever_pb2.SCORING_MODE_COMBINED,
        ):
            scored = await retrieve(st, scoring=mode)
            assert top1(scored) == list(QUERIES)
            best = scored.plans[0].candidates[0]
            assert best.sample_score > 0 and best.centroid_score > 0

        base_only = await retrieve(st, min_score=0.99)
        assert all(p.below_min_score and not p.plan.adapters for p in base_only.plans)
        assert all(len(p.candidates) == 3 for p in base_only.plans)  # still explained

        explained = await st.retriever.Explain(
            retriever_pb2.ExplainRequest(
                prompt=QUERIES["sql"], base_model=BASE, scoring=retriever_pb2.SCORING_MODE_COMBINED
            )
        )
        assert [c.adapter_id for c in explained.candidates][0] == "sql"
        assert len(explained.candidates) == 5 and explained.embedding_model
        assert explained.min_score == pytest.approx(0.1)


async def test_filters_exclude_what_they_should(tmp_path, tiny_model_dir, tiny_adapters):
    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        other = "tiny-llama-b"  # a second tenant: same architecture, its own adapters
        await st.registry.RegisterBaseModel(
            registry_pb2.RegisterBaseModelRequest(
                base_model_id=other, config_json=(tiny_model_dir / "config.json").read_text()
            )
        )
        await push_pool(st, tiny_adapters)
        await st.push("sql-other-base", tiny_adapters[6], SAMPLES["sql"], base_model=other)

        def ids(resp) -> set[str]:
            return {c.adapter_id for p in resp.plans for c in p.candidates}

        everything = await retrieve(st, top_k=8, strategy=S.COMPOSITION_STRATEGY_SELECTION)
        assert ids(everything) == set(SAMPLES)  # the other tenant's adapter never shows
        tenant_b = await retrieve(st, base_model=other, top_k=8,
                                  strategy=S.COMPOSITION_STRATEGY_SELECTION)  # fmt: skip
        assert ids(tenant_b) == {"sql-other-base"}

        cases = [
            (retriever_pb2.RetrievalFilter(tags=["generate"]), {"translation", "sql", "poetry"}),
            (retriever_pb2.RetrievalFilter(tags=["text", "generate"]), {"translation", "poetry"}),
            (retriever_pb2.RetrievalFilter(domain="nlg"), {"translation", "poetry"}),
            (retriever_pb2.RetrievalFilter(adapter_ids=["sql", "arithmetic", "nope"]),
             {"sql", "arithmetic"}),
            (retriever_pb2.RetrievalFilter(tags=["math"], domain="nlg"), set()),
        ]  # fmt: skip
        for flt, expected in cases:
            for mode in (retriever_pb2.SCORING_MODE_CENTROID, retriever_pb2.SCORING_MODE_COMBINED):
                resp = await retrieve(st, top_k=8, filter=flt, scoring=mode,
                                      strategy=S.COMPOSITION_STRATEGY_SELECTION)  # fmt: skip
                assert ids(resp) == expected, (flt, mode)

        # Status: points not READY (e.g. a version being re-ingested) are never candidates.
        client = V.open_qdrant(st.common)
        flt = V.models.Filter(
            must=[V.models.FieldCondition(key=V.P_ADAPTER_ID,
                                          match=V.models.MatchValue(value="sql"))]
        )  # fmt: skip
        client.set_payload(V.active_collection(client), {V.P_STATUS: "EMBEDDING"}, points=flt)
        resp = await retrieve(st, top_k=8, strategy=S.COMPOSITION_STRATEGY_SELECTION,
                              scoring=retriever_pb2.SCORING_MODE_COMBINED)  # fmt: skip
        assert ids(resp) == set(SAMPLES) - {"sql"}


async def test_deleted_disappear_and_new_adapters_appear_while_serving(
    tmp_path, tiny_model_dir, tiny_adapters
):
    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        await push_pool(st, tiny_adapters, tasks=("sentiment", "arithmetic", "sql", "poetry"))
        before = await retrieve(st, prompts=[QUERIES["sql"], QUERIES["translation"]])
        assert top1(before)[0] == "sql" and top1(before)[1] != "translation"

        await st.registry.DeleteAdapter(registry_pb2.DeleteAdapterRequest(adapter_id="sql"))
        await wait_until(st, lambda ids: "sql" not in ids)

        # Pushed while serving: retrievable once READY, without a restart.
        await st.push("translation", tiny_adapters[5], SAMPLES["translation"])
        after = await retrieve(st, prompts=[QUERIES["translation"]])
        assert top1(after) == ["translation"]

        # A new version of an adapter stands for it (no duplicate candidates).
        await st.push("poetry", tiny_adapters[7], SAMPLES["poetry"][:3])
        resp = await retrieve(st, prompts=[QUERIES["poetry"]], top_k=4, min_score=-1,
                              strategy=S.COMPOSITION_STRATEGY_SELECTION,
                              scoring=retriever_pb2.SCORING_MODE_COMBINED)  # fmt: skip
        cands = [(c.adapter_id, c.version) for c in resp.plans[0].candidates]
        assert cands[0] == ("poetry", 2) and len({a for a, _ in cands}) == len(cands)


async def wait_until(st: Stack, done, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        resp = await retrieve(st, top_k=8, strategy=S.COMPOSITION_STRATEGY_SELECTION, min_score=-1)
        ids = {c.adapter_id for p in resp.plans for c in p.candidates}
        if done(ids):
            return
        assert time.monotonic() < deadline, f"timed out; candidates {ids}"
        await asyncio.sleep(0.1)
