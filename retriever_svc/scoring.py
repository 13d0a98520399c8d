"""Scoring modes: raw hits of one prompt -> adapters ranked by the mode's score.

    CENTROID:        score = cos(prompt, mean of the adapter's sample embeddings)  (LoraRetriever)
    NEAREST_SAMPLE:  score = mean of the m highest cos(prompt, sample) of the adapter
    COMBINED:        score = w * centroid + (1 - w) * nearest-sample

Measured on the 48-task pool with all-MiniLM-L6-v2 (bench/retrieval_quality.py,
docs/benchmarks.md): nearest-sample alone ranks worse than the centroid at top-1, the
combination (w = 0.7, m = 1) a little better. CENTROID stays the default: the paper's recipe,
one request per prompt instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from retriever_svc.search import Hits


class Mode(IntEnum):
    """Mirrors ``retriever_pb2.ScoringMode`` (same numbers)."""

    CENTROID = 1
    NEAREST_SAMPLE = 2
    COMBINED = 3


@dataclass(frozen=True, slots=True)
class Scored:
    adapter_id: str
    version: int
    score: float
    centroid_score: float
    sample_score: float
    domain: str


def rank(hits: Hits, mode: Mode, *, centroid_weight: float, nearest: int) -> list[Scored]:
    """All adapters seen in the hits, best first (ties broken by adapter id)."""
    use_samples = mode is not Mode.CENTROID
    names = set(hits.centroid) | (set(hits.samples) if use_samples else set())
    out: list[Scored] = []
    for name in names:
        c = _centroid_score(hits, name)
        s = _sample_score(hits, name, nearest, fallback=c) if use_samples else 0.0
        if c is None:  # only sample hits: the sample score stands in for the centroid
            c = s
        if mode is Mode.CENTROID:
            score = c
        elif mode is Mode.NEAREST_SAMPLE:
            score = s
        else:
            score = centroid_weight * c + (1.0 - centroid_weight) * s
        out.append(
            Scored(name, hits.versions.get(name, 0), score, c, s, hits.domains.get(name, ""))
        )
    out.sort(key=lambda x: (-x.score, x.adapter_id))
    return out


def _centroid_score(hits: Hits, name: str) -> float | None:
    if name in hits.centroid:
        return hits.centroid[name]
    return hits.centroid_tail


def _sample_score(hits: Hits, name: str, nearest: int, *, fallback: float | None) -> float:
    scores = hits.samples.get(name, [])
    m = max(1, nearest)
    if len(scores) < m and hits.sample_tail is not None:
        scores = scores + [hits.sample_tail] * (m - len(scores))
    if scores:
        top = scores[:m]
        return sum(top) / len(top)
    return fallback if fallback is not None else 0.0
