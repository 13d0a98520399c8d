"""Qdrant search for a batch of prompt embeddings: one ``query_batch_points`` round trip.

Per prompt the batch holds up to two requests, both filtered by base model, status READY and
the request's tags / domain / allow-list:

    centroid request: kind == centroid, limit C  -> centroid_score per adapter
    sample request:   kind == sample,   limit L  -> the adapter's best sample similarities

Running example (k=3, candidate_factor=4, samples_per_candidate=20): C = 12 centroid hits and
L = 240 sample hits per prompt; a batch of 32 prompts in NEAREST_SAMPLE mode is one call with
64 requests. The sample request runs only in NEAREST_SAMPLE and COMBINED modes.

An adapter missing from a truncated hit list gets the list's last score as its score (an upper
bound on what it could have had); missing from a list that was not truncated means it has no
such points, and the other score stands in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from qdrant_client import QdrantClient, models

from loraserve import vectors as V

_PAYLOAD = [V.P_ADAPTER_ID, V.P_VERSION, V.P_DOMAIN]


@dataclass(slots=True)
class SearchFilter:
    base_model: str
    tags: list[str] = field(default_factory=list)
    domain: str = ""
    adapter_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Hits:
    """Raw hits of one prompt: adapter -> centroid score, adapter -> sample scores (desc)."""

    centroid: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)
    centroid_tail: float | None = None  # last score of a truncated centroid list
    sample_tail: float | None = None  # last score of a truncated sample list


def qdrant_filter(flt: SearchFilter, kind: str) -> models.Filter:
    must: list[models.Condition] = [
        models.FieldCondition(key=V.P_BASE_MODEL, match=models.MatchValue(value=flt.base_model)),
        models.FieldCondition(key=V.P_STATUS, match=models.MatchValue(value=V.STATUS_READY)),
        models.FieldCondition(key=V.P_KIND, match=models.MatchValue(value=kind)),
    ]
    # An adapter must carry every tag listed (as the registry's AdapterFilter).
    must += [
        models.FieldCondition(key=V.P_TAGS, match=models.MatchValue(value=t)) for t in flt.tags
    ]
    if flt.domain:
        must.append(
            models.FieldCondition(key=V.P_DOMAIN, match=models.MatchValue(value=flt.domain))
        )
    if flt.adapter_ids:
        must.append(
            models.FieldCondition(key=V.P_ADAPTER_ID, match=models.MatchAny(any=flt.adapter_ids))
        )
    return models.Filter(must=must)


def search(
    client: QdrantClient,
    collection: str,
    vectors: np.ndarray,
    flt: SearchFilter,
    *,
    centroid_limit: int,
    sample_limit: int,
) -> list[Hits]:
    """Hits per prompt (rows of ``vectors``); ``sample_limit`` 0 skips the sample requests."""
    centroid_filter = qdrant_filter(flt, V.KIND_CENTROID)
    sample_filter = qdrant_filter(flt, V.KIND_SAMPLE)
    requests: list[models.QueryRequest] = []
    for vec in vectors:
        query = vec.astype(np.float32).tolist()
        requests.append(
            models.QueryRequest(
                query=query, filter=centroid_filter, limit=centroid_limit, with_payload=_PAYLOAD
            )
        )
        if sample_limit > 0:
            requests.append(
                models.QueryRequest(
                    query=query, filter=sample_filter, limit=sample_limit, with_payload=_PAYLOAD
                )
            )
    if not requests:
        return []
    responses = client.query_batch_points(collection, requests=requests)
    per_prompt = 2 if sample_limit > 0 else 1
    out: list[Hits] = []
    for i in range(len(vectors)):
        hits = Hits()
        _read_centroids(hits, responses[i * per_prompt].points, centroid_limit)
        if sample_limit > 0:
            _read_samples(hits, responses[i * per_prompt + 1].points, sample_limit)
        out.append(hits)
    return out


def _read_centroids(hits: Hits, points: list[models.ScoredPoint], limit: int) -> None:
    for p in points:
        adapter_id, version = _identity(p)
        if _newer(hits, adapter_id, version):
            hits.centroid[adapter_id] = float(p.score)
            hits.samples.pop(adapter_id, None)
            _remember(hits, adapter_id, version, p)
    if len(points) >= limit and points:
        hits.centroid_tail = float(points[-1].score)


def _read_samples(hits: Hits, points: list[models.ScoredPoint], limit: int) -> None:
    for p in points:  # sorted by score, best first
        adapter_id, version = _identity(p)
        if adapter_id in hits.versions and version < hits.versions[adapter_id]:
            continue
        if adapter_id in hits.versions and version > hits.versions[adapter_id]:
            hits.centroid.pop(adapter_id, None)
            hits.samples.pop(adapter_id, None)
        _remember(hits, adapter_id, version, p)
        hits.samples.setdefault(adapter_id, []).append(float(p.score))
    if len(points) >= limit and points:
        hits.sample_tail = float(points[-1].score)


def _identity(p: models.ScoredPoint) -> tuple[str, int]:
    payload = p.payload or {}
    return str(payload.get(V.P_ADAPTER_ID, "")), int(payload.get(V.P_VERSION, 0))


def _newer(hits: Hits, adapter_id: str, version: int) -> bool:
    """Several READY versions of one adapter: the latest one stands for the adapter."""
    return adapter_id not in hits.versions or version > hits.versions[adapter_id]


def _remember(hits: Hits, adapter_id: str, version: int, p: models.ScoredPoint) -> None:
    hits.versions[adapter_id] = version
    hits.domains[adapter_id] = str((p.payload or {}).get(V.P_DOMAIN, ""))
