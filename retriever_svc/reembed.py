"""Re-embed the READY pool into a new collection, and keep it in step with the registry.

A collection is per embedding model, shared by every base model (``base_model`` is the tenant
key), so a new model re-embeds every tenant's READY adapters, not only the trained one's.
Points follow ``loraserve.vectors`` exactly (written by the registry's own ``upsert_adapter``).

``reconcile`` brings a collection in line with the registry's READY records: adapters that
became READY while the pool was re-embedded are added, adapters deleted meanwhile removed.
It runs before the alias moves and once more right after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from qdrant_client import QdrantClient, models

from loraserve import vectors as V
from loraserve.embedding import Embedder
from loraserve.settings import CommonSettings
from registry_svc.jobs import ready_adapters_with_samples
from registry_svc.vector_index import upsert_adapter

Key = tuple[str, int]  # (adapter_id, version)


@dataclass(frozen=True, slots=True)
class PoolEntry:
    adapter_id: str
    version: int
    base_model: str
    domain: str
    tags: list[str]
    samples: list[str]


def read_pool(common: CommonSettings, base_models: Iterable[str]) -> dict[Key, PoolEntry]:
    """Every READY adapter version (with sample inputs) of these base models."""
    pool: dict[Key, PoolEntry] = {}
    for base in sorted(set(base_models)):
        for adapter_id, version, domain, tags, samples in ready_adapters_with_samples(common, base):
            if samples:
                pool[(adapter_id, version)] = PoolEntry(
                    adapter_id, version, base, domain, tags, samples
                )
    return pool


def base_models_in(client: QdrantClient, collection: str | None) -> set[str]:
    """Tenants present in a collection (scrolls its centroid points)."""
    if collection is None:
        return set()
    flt = models.Filter(
        must=[models.FieldCondition(key=V.P_KIND, match=models.MatchValue(value=V.KIND_CENTROID))]
    )
    found: set[str] = set()
    offset = None
    while True:
        points, offset = client.scroll(
            collection, scroll_filter=flt, limit=512, offset=offset, with_payload=[V.P_BASE_MODEL]
        )
        found.update(str((p.payload or {}).get(V.P_BASE_MODEL, "")) for p in points)
        if offset is None:
            return found - {""}


def create_collection(
    client: QdrantClient, name: str, dim: int, model_id: str, model_dir: str
) -> None:
    """A fresh collection (a leftover of an earlier attempt is dropped) naming its model."""
    if client.collection_exists(name):
        client.delete_collection(name)
    V.ensure_collection(client, name, dim)
    client.update_collection(
        name, metadata={V.META_MODEL_ID: model_id, V.META_MODEL_PATH: model_dir}
    )


def write_entries(
    client: QdrantClient,
    collection: str,
    embedder: Embedder,
    entries: list[PoolEntry],
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 16,
) -> None:
    """Embed and upsert ``entries``, ``chunk`` adapters per encode call."""
    for start in range(0, len(entries), chunk):
        part = entries[start : start + chunk]
        vectors = embedder.embed([t for e in part for t in e.samples], use_cache=False).vectors
        offset = 0
        for e in part:
            upsert_adapter(
                client,
                collection,
                adapter_id=e.adapter_id,
                version=e.version,
                base_model=e.base_model,
                tags=e.tags,
                domain=e.domain,
                sample_embeddings=vectors[offset : offset + len(e.samples)],
            )
            offset += len(e.samples)
        if progress is not None:
            progress(start + len(part), len(entries))


def indexed_keys(client: QdrantClient, collection: str) -> set[Key]:
    flt = models.Filter(
        must=[models.FieldCondition(key=V.P_KIND, match=models.MatchValue(value=V.KIND_CENTROID))]
    )
    keys: set[Key] = set()
    offset = None
    while True:
        points, offset = client.scroll(
            collection,
            scroll_filter=flt,
            limit=512,
            offset=offset,
            with_payload=[V.P_ADAPTER_ID, V.P_VERSION],
        )
        for p in points:
            payload = p.payload or {}
            keys.add((str(payload.get(V.P_ADAPTER_ID)), int(payload.get(V.P_VERSION, 0))))
        if offset is None:
            return keys


def reconcile(
    common: CommonSettings,
    client: QdrantClient,
    collection: str,
    embedder: Embedder,
    base_models: Iterable[str],
) -> tuple[int, int]:
    """Add READY versions missing from ``collection``, drop versions no longer READY."""
    pool = read_pool(common, set(base_models) | base_models_in(client, collection))
    have = indexed_keys(client, collection)
    missing = [pool[k] for k in sorted(set(pool) - have)]
    write_entries(client, collection, embedder, missing)
    stale = sorted(have - set(pool))
    for adapter_id, version in stale:
        flt = models.Filter(
            must=[
                models.FieldCondition(
                    key=V.P_ADAPTER_ID, match=models.MatchValue(value=adapter_id)
                ),
                models.FieldCondition(key=V.P_VERSION, match=models.MatchValue(value=version)),
            ]
        )
        client.delete(collection, points_selector=models.FilterSelector(filter=flt), wait=True)
    return len(missing), len(stale)
