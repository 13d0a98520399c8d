"""Retrieve-then-compose for a batch of prompts: embed, search, score, plan.

Synchronous (embedding is CPU/GPU work); the servicer runs it in a worker thread.

Based on: LoraRetriever (Zhao et al., ACL Findings 2024): adapters represented by the mean
embedding of their sample inputs, top-k retrieval per prompt, mixture or fusion of the top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve import vectors as V
from loraserve.api.v1 import common_pb2
from retriever_svc.active_model import ActiveIndex
from retriever_svc.plans import build_plan
from retriever_svc.scoring import Mode, Scored, rank
from retriever_svc.search import Hits, search
from retriever_svc.settings import RetrieverSettings
from retriever_svc.validation import Query


@dataclass(slots=True)
class PromptResult:
    candidates: list[Scored]
    plan: common_pb2.LoraPlan
    below_min_score: bool
    truncated: bool


def retrieve(settings: RetrieverSettings, index: ActiveIndex, query: Query) -> list[PromptResult]:
    """One PromptResult per prompt of ``query``, in order."""
    embedded = index.embedder.embed(query.prompts)
    k = query.top_k
    if index.collection is None:  # nothing ingested yet: every plan is the base model
        all_hits = [Hits() for _ in query.prompts]
    else:
        centroid_limit = max(k, k * settings.candidate_factor)
        sample_limit = (
            0 if query.mode is Mode.CENTROID else centroid_limit * settings.samples_per_candidate
        )
        all_hits = search(
            V.open_qdrant(settings.common),
            index.collection,
            embedded.vectors,
            query.search,
            centroid_limit=centroid_limit,
            sample_limit=sample_limit,
        )
    out: list[PromptResult] = []
    for hits, truncated in zip(all_hits, embedded.truncated, strict=True):
        ranked = rank(
            hits,
            query.mode,
            centroid_weight=settings.centroid_weight,
            nearest=settings.nearest_samples,
        )[:k]
        plan, below = build_plan(ranked, query.plan)
        out.append(PromptResult(ranked, plan, below, truncated))
    return out
