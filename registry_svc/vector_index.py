"""Qdrant writes of the registry (run only inside Celery tasks), following loraserve.vectors.

Per READY adapter version: one centroid point (mean of its sample-input embeddings,
re-normalised: LoraRetriever's adapter representation) and one point per sample input. Ids are
uuid5 of ``adapter_id@version`` (and ``#sample<i>``), so a re-run overwrites instead of
duplicating.
"""

from __future__ import annotations

import numpy as np
from qdrant_client import QdrantClient, models

from loraserve import vectors as V


def centroid(embeddings: np.ndarray) -> np.ndarray:
    """Mean of unit vectors, re-normalised to unit length."""
    mean = embeddings.astype(np.float32).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else mean


def prepare_collection(client: QdrantClient, name: str, dim: int) -> None:
    """Create the collection with its payload indexes; point the active alias at it if no
    alias exists yet (a retrained embedding model moves the alias itself)."""
    V.ensure_collection(client, name, dim)
    if V.active_collection(client) is None:
        V.set_active_collection(client, name)


def upsert_adapter(
    client: QdrantClient,
    collection: str,
    *,
    adapter_id: str,
    version: int,
    base_model: str,
    tags: list[str],
    domain: str,
    sample_embeddings: np.ndarray,
) -> int:
    """Write the centroid and sample points of one version; returns the number of points."""
    payload = {
        V.P_ADAPTER_ID: adapter_id,
        V.P_VERSION: version,
        V.P_BASE_MODEL: base_model,
        V.P_STATUS: V.STATUS_READY,
        V.P_TAGS: list(tags),
        V.P_DOMAIN: domain,
    }
    points = [
        models.PointStruct(
            id=V.centroid_point_id(adapter_id, version),
            vector=centroid(sample_embeddings).tolist(),
            payload={**payload, V.P_KIND: V.KIND_CENTROID},
        )
    ]
    for i, vec in enumerate(sample_embeddings):
        points.append(
            models.PointStruct(
                id=V.sample_point_id(adapter_id, version, i),
                vector=vec.tolist(),
                payload={**payload, V.P_KIND: V.KIND_SAMPLE, V.P_SAMPLE_INDEX: i},
            )
        )
    client.upsert(collection, points=points, wait=True)
    return len(points)


def delete_adapter(client: QdrantClient, adapter_id: str, versions: list[int] | None) -> None:
    """Remove an adapter's points (some versions, or all) from every adapters collection."""
    must: list[models.Condition] = [
        models.FieldCondition(key=V.P_ADAPTER_ID, match=models.MatchValue(value=adapter_id))
    ]
    if versions:
        must.append(models.FieldCondition(key=V.P_VERSION, match=models.MatchAny(any=versions)))
    selector = models.FilterSelector(filter=models.Filter(must=must))
    for coll in client.get_collections().collections:
        if coll.name.startswith("adapters__"):
            client.delete(coll.name, points_selector=selector, wait=True)


def count_points(client: QdrantClient, collection: str, adapter_id: str) -> int:
    """Points of one adapter (all versions) in a collection."""
    flt = models.Filter(
        must=[models.FieldCondition(key=V.P_ADAPTER_ID, match=models.MatchValue(value=adapter_id))]
    )
    return client.count(collection, count_filter=flt, exact=True).count
