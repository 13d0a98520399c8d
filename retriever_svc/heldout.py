"""The held-out check of TrainRetriever: split each adapter's samples, measure retrieval.

    for each adapter a: shuffle its samples; hold out round(frac * n) of them (n >= 2, at
    least one stays for training)
    accuracy@k = share of held-out samples whose adapter is among the k adapters with the most
    similar centroid (mean of the *training* samples' embeddings, as the registry builds them)

    out-of-distribution same-domain top-1 (``ood_accuracy``) = for each held-out sample of an
    adapter whose domain has another adapter in the pool: remove its own adapter from the
    candidates; is the best remaining centroid of the same domain?

The same split is scored with the current and the new model; the new one is switched in only
if it does not do worse (on top-1). The out-of-distribution figure is the validation metric
used to choose the training defaults (docs/benchmarks.md), from the pool's own samples only.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

from loraserve.embedding import Embedder


@dataclass(slots=True)
class Split:
    train: dict[str, list[str]]
    held: dict[str, list[str]]

    @property
    def held_count(self) -> int:
        return sum(len(v) for v in self.held.values())

    @property
    def train_count(self) -> int:
        return sum(len(v) for v in self.train.values())


def split_samples(pool: dict[str, list[str]], fraction: float, seed: int) -> Split:
    rng = random.Random(seed)
    train: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for key in sorted(pool):
        texts = list(dict.fromkeys(pool[key]))  # duplicates would leak across the split
        rng.shuffle(texts)
        n_held = min(len(texts) - 1, round(fraction * len(texts))) if len(texts) >= 2 else 0
        held[key] = texts[:n_held]
        train[key] = texts[n_held:]
    return Split(train, held)


def accuracy(
    embedder: Embedder,
    split: Split,
    ks: tuple[int, ...] = (1, 3),
    domains: dict[str, str] | None = None,
) -> dict[str, float]:
    """Top-k accuracy of centroid retrieval for the held-out samples (``{"top1": ...}``).

    With ``domains`` (adapter -> domain) also ``ood_top1``: the out-of-distribution
    same-domain top-1 (module docstring); NaN when no adapter has a same-domain peer.
    """
    keys = sorted(k for k in split.train if split.train[k])
    scores, gold = _scores(embedder, split, keys)
    if gold.size == 0:
        out = {f"top{k}": float("nan") for k in ks}
    else:
        order = np.argsort(-scores, axis=1, kind="stable")
        out = {
            f"top{k}": float(np.mean([gold[i] in order[i, :k] for i in range(len(gold))]))
            for k in ks
        }
    if domains is not None:
        out["ood_top1"] = _ood_top1(scores, gold, [domains.get(k, "") for k in keys])
    return out


def _scores(embedder: Embedder, split: Split, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Held-out samples x train centroids (cosine), and each sample's adapter index."""
    texts = [t for k in keys for t in split.train[k]]
    train_vecs = embedder.embed(texts, use_cache=False).vectors
    bounds = np.cumsum([0] + [len(split.train[k]) for k in keys])
    centroids = np.stack([_centroid(train_vecs[a:b]) for a, b in itertools.pairwise(bounds)])
    queries = [(i, t) for i, k in enumerate(keys) for t in split.held.get(k, [])]
    if not queries:
        return np.zeros((0, len(keys))), np.zeros(0, dtype=int)
    vecs = embedder.embed([t for _, t in queries], use_cache=False).vectors
    if not np.isfinite(vecs).all() or not np.isfinite(centroids).all():
        raise FloatingPointError("the model produces non-finite embeddings")
    return vecs @ centroids.T, np.array([g for g, _ in queries])


def _ood_top1(scores: np.ndarray, gold: np.ndarray, domains: list[str]) -> float:
    """Own adapter removed: share of samples whose best other centroid shares their domain."""
    hits, n = 0, 0
    for row, g in zip(scores, gold, strict=True):
        dom = domains[g]
        if not dom or sum(d == dom for d in domains) < 2:
            continue  # no same-domain peer to find
        masked = row.copy()
        masked[g] = -np.inf
        hits += domains[int(np.argmax(masked))] == dom
        n += 1
    return hits / n if n else float("nan")


def _centroid(vectors: np.ndarray) -> np.ndarray:
    mean = vectors.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else mean
