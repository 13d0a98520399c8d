"""The Qdrant schema shared by the registry (writer) and the retriever (reader).

One collection per embedding model: ``adapters__<model slug>``. Each READY adapter version has
one *centroid* point (mean of its sample-input embeddings, LoraRetriever's representation) and
one *sample* point per sample input (for nearest-sample scoring). ``base_model`` is the tenant
key. Point ids are deterministic (uuid5), so a retried ingestion overwrites instead of
duplicating.

The alias ``adapters_active`` names the collection in use (``active_collection``); a retrained
embedding model re-embeds the pool into a new collection and is switched in atomically by
moving the alias (``set_active_collection``). The collection's name encodes the model id.
A collection made by a retrained model carries that model's directory in its metadata
(``META_MODEL_PATH``): whoever embeds into or queries the active collection must use the model
``collection_model`` names (None = the default model, ``common.embedding_model`` or bundled).

Local mode (``QdrantClient(path=...)``) allows one process per path; ``open_qdrant`` keeps one
client per path per process so every component of a process shares it.
"""

from __future__ import annotations

import functools
import re
import threading
import uuid
import warnings
from pathlib import Path

from qdrant_client import QdrantClient, models

from loraserve.settings import CommonSettings

ACTIVE_ALIAS = "adapters_active"
POINT_NAMESPACE = uuid.UUID("6f1c1f4e-5b7a-4c52-9a55-3d1f4a2b7c10")

KIND_CENTROID = "centroid"
KIND_SAMPLE = "sample"

# Payload keys (every point carries all of them; sample points add sample_index).
P_ADAPTER_ID = "adapter_id"
P_VERSION = "version"
P_BASE_MODEL = "base_model"
P_STATUS = "status"  # "READY" for points the retriever may return
P_TAGS = "tags"
P_DOMAIN = "domain"
P_KIND = "kind"
P_SAMPLE_INDEX = "sample_index"

STATUS_READY = "READY"

# Collection metadata keys (set by TrainRetriever on the collections it creates).
META_MODEL_ID = "embedding_model_id"
META_MODEL_PATH = "embedding_model_path"

INDEXED_FIELDS: dict[str, models.PayloadSchemaType] = {
    P_BASE_MODEL: models.PayloadSchemaType.KEYWORD,
    P_STATUS: models.PayloadSchemaType.KEYWORD,
    P_TAGS: models.PayloadSchemaType.KEYWORD,
    P_DOMAIN: models.PayloadSchemaType.KEYWORD,
    P_KIND: models.PayloadSchemaType.KEYWORD,
    P_ADAPTER_ID: models.PayloadSchemaType.KEYWORD,
}


def collection_name(embedding_model_id: str) -> str:
    """``adapters__<slug>`` for an embedding model id such as ``all-MiniLM-L6-v2@1``."""
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", embedding_model_id).strip("_").lower()
    return f"adapters__{slug}"


def centroid_point_id(adapter_id: str, version: int) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{adapter_id}@{version}"))


def sample_point_id(adapter_id: str, version: int, index: int) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{adapter_id}@{version}#sample{index}"))


def ensure_collection(client: QdrantClient, name: str, dim: int) -> None:
    """Create the collection (cosine) with its payload indexes if it does not exist."""
    if not client.collection_exists(name):
        client.create_collection(
            name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
        )
        # Local mode warns that indexes are no-ops there; they matter on a Qdrant server.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            for field, schema in INDEXED_FIELDS.items():
                client.create_payload_index(name, field_name=field, field_schema=schema)


def active_collection(client: QdrantClient) -> str | None:
    """The collection the alias points at, or None before the first ingestion."""
    for alias in client.get_aliases().aliases:
        if alias.alias_name == ACTIVE_ALIAS:
            return alias.collection_name
    return None


def collection_model(client: QdrantClient, name: str) -> tuple[str | None, str | None]:
    """``(model_id, model_dir)`` recorded on a collection; ``(None, None)`` = the default model."""
    meta = client.get_collection(name).config.metadata or {}
    return meta.get(META_MODEL_ID), meta.get(META_MODEL_PATH)


def set_active_collection(client: QdrantClient, name: str) -> None:
    """Atomically point the alias at ``name`` (delete + create in one request)."""
    ops: list = []
    if active_collection(client) is not None:
        ops.append(
            models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=ACTIVE_ALIAS))
        )
    ops.append(
        models.CreateAliasOperation(
            create_alias=models.CreateAlias(collection_name=name, alias_name=ACTIVE_ALIAS)
        )
    )
    client.update_collection_aliases(change_aliases_operations=ops)


class SerializedQdrant:
    """A local-mode client whose calls run one at a time.

    Local mode is plain in-process Python state: in the one-machine default the Celery worker
    threads upsert while the retriever searches, and unsynchronised calls can see (or raise
    on) collections mid-update. Server clients need no lock and are returned bare.
    """

    def __init__(self, client: QdrantClient):
        self._client = client
        self._lock = threading.RLock()

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return call


_clients: dict[str, QdrantClient] = {}
_clients_lock = threading.Lock()


def open_qdrant(settings: CommonSettings) -> QdrantClient:
    """The process-wide client: a server when ``qdrant_url`` is set, else local mode on disk."""
    key = settings.qdrant_url or str(Path(settings.qdrant_path).resolve())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            if settings.qdrant_url:
                client = QdrantClient(
                    url=settings.qdrant_url, api_key=settings.qdrant_api_key or None
                )
            else:
                Path(settings.qdrant_path).mkdir(parents=True, exist_ok=True)
                client = SerializedQdrant(QdrantClient(path=str(settings.qdrant_path)))
            _clients[key] = client  # type: ignore[assignment] - same interface
        return client


def close_qdrant(settings: CommonSettings) -> None:
    key = settings.qdrant_url or str(Path(settings.qdrant_path).resolve())
    with _clients_lock:
        client = _clients.pop(key, None)
    if client is not None:
        client.close()
