"""Which collection is active and which embedding model scores prompts against it.

The alias ``adapters_active`` names the collection; the collection's metadata names the model
that embedded it (``loraserve.vectors.collection_model``; none = the default model). Every
request looks the alias up (an in-memory read in local mode), so a collection switched in by
TrainRetriever is used from the next request on, with its own model: no restart.

``data_dir/models/index.json`` keeps a readable record of the trained models
(collection -> model id, directory, job, metrics); the collection metadata is authoritative.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraserve import vectors as V
from loraserve.embedding import Embedder, default_model_path
from loraserve.settings import CommonSettings


@dataclass(frozen=True, slots=True)
class ActiveIndex:
    collection: str | None  # None: nothing ingested yet
    embedder: Embedder


def default_embedding_dir(common: CommonSettings) -> Path:
    return Path(common.embedding_model) if common.embedding_model else default_model_path()


def models_dir(common: CommonSettings) -> Path:
    return Path(common.data_dir) / "models"


def model_dir_for_collection(common: CommonSettings, collection: str | None) -> Path:
    """The directory of the model that embedded ``collection`` (the default model if unknown)."""
    if collection is None:
        return default_embedding_dir(common)
    _, path = V.collection_model(V.open_qdrant(common), collection)
    return Path(path) if path else default_embedding_dir(common)


class EmbedderPool:
    """One Embedder per model directory, loaded on first use (seconds), kept for the process."""

    def __init__(self, instruction_prefix: str = "", cache_size: int = 4096):
        self._prefix = instruction_prefix
        self._cache_size = cache_size
        self._embedders: dict[Path, Embedder] = {}
        self._lock = threading.Lock()

    def get(self, model_dir: Path) -> Embedder:
        key = model_dir.resolve()
        with self._lock:
            emb = self._embedders.get(key)
            if emb is None:
                model_id = _model_id_of(key)
                emb = Embedder(
                    key,
                    model_id=model_id,
                    instruction_prefix=self._prefix,
                    cache_size=self._cache_size,
                )
                self._embedders[key] = emb
            return emb


_pools: dict[tuple[str, int], EmbedderPool] = {}
_pools_lock = threading.Lock()


def shared_pool(instruction_prefix: str = "", cache_size: int = 4096) -> EmbedderPool:
    """One pool per (prefix, cache size) per process: servers built in one process share models."""
    with _pools_lock:
        key = (instruction_prefix, cache_size)
        if key not in _pools:
            _pools[key] = EmbedderPool(instruction_prefix, cache_size)
        return _pools[key]


class ActiveModel:
    """Resolves the active collection and its embedder, following alias switches."""

    def __init__(self, common: CommonSettings, pool: EmbedderPool):
        self._common = common
        self._pool = pool
        self._lock = threading.Lock()
        self._current: ActiveIndex | None = None

    def current(self) -> ActiveIndex:
        name = V.active_collection(V.open_qdrant(self._common))
        with self._lock:
            if self._current is not None and self._current.collection == name:
                return self._current
        embedder = self._pool.get(model_dir_for_collection(self._common, name))
        with self._lock:
            self._current = ActiveIndex(name, embedder)
            return self._current


def _model_id_of(model_dir: Path) -> str | None:
    """A trained model's id from its ``loraserve_model.json``; None lets Embedder derive one."""
    info = model_dir / "loraserve_model.json"
    if info.is_file():
        return json.loads(info.read_text()).get("model_id")
    return None


def record_model(common: CommonSettings, collection: str, entry: dict[str, Any]) -> None:
    """Add ``collection -> entry`` to ``models/index.json`` (atomic replace)."""
    path = models_dir(common) / "index.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    index = json.loads(path.read_text()) if path.is_file() else {}
    index[collection] = {**entry, "recorded_at": time.time()}
    _write_index(path, index)


def _write_index(path: Path, index: dict[str, Any]) -> None:
    """Replace ``models/index.json`` atomically."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
    tmp.replace(path)


def retire_old_collections(common: CommonSettings, client, active: str, keep: int) -> list[str]:
    """Delete collections switched away from more than ``keep`` switches ago, with their models.

    Only collections ``models/index.json`` knows as once active (an entry, or an entry's
    ``previous``) are candidates, so a collection a concurrent job is still building is never
    touched; the active one and the ``keep`` before it (for rollback) stay. A retired trained
    model's directory goes too when it lies under ``data_dir/models`` (never the shipped default).
    Returns the deleted collection names.
    """
    path = models_dir(common) / "index.json"
    index = json.loads(path.read_text()) if path.is_file() else {}
    kept, name = {active}, active
    for _ in range(keep):
        name = (index.get(name) or {}).get("previous")
        if not name:
            break
        kept.add(name)
    known = set(index) | {e.get("previous") for e in index.values() if e.get("previous")}
    retired = []
    for name in sorted(known - kept):
        exists, entry = client.collection_exists(name), index.pop(name, None)
        if exists:
            client.delete_collection(name)
        model_dir = Path((entry or {}).get("model_dir") or "")
        if model_dir.parts and model_dir.resolve().is_relative_to(models_dir(common).resolve()):
            shutil.rmtree(model_dir, ignore_errors=True)
        if exists or entry is not None:
            retired.append(name)
    if retired:
        _write_index(path, index)
    return retired
