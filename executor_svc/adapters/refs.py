"""Names of adapters inside the executor, and the contract every adapter source meets.

An :class:`AdapterKey` names one immutable adapter version (``version`` is never 0 here: a
request's "latest READY" is resolved to a number before anything is fetched or cached). A
:class:`FusionKey` names the fused adapter of a FUSION plan: the exact component versions and
weights, so the same plan always maps to the same cached fused weights. Both are hashable and
are what the host cache and the GPU slots are keyed by.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class AdapterKey:
    adapter_id: str
    version: int

    def __str__(self) -> str:
        return f"{self.adapter_id}@{self.version}"


@dataclass(frozen=True, slots=True)
class FusionKey:
    """A fused adapter: ``components`` in plan order with their weights."""

    components: tuple[tuple[AdapterKey, float], ...]

    @property
    def adapter_id(self) -> str:
        # Stable, short and readable in ListResidentAdapters: "fusion-<12 hex>".
        text = ",".join(f"{k}*{w!r}" for k, w in self.components)
        return "fusion-" + hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def version(self) -> int:
        return 0

    def __str__(self) -> str:
        inner = " + ".join(f"{w:g}*{k}" for k, w in self.components)
        return f"fusion({inner})"


Key = AdapterKey | FusionKey


@dataclass(frozen=True, slots=True)
class ResolvedAdapter:
    """A concrete adapter version as its source knows it."""

    key: AdapterKey
    # Hex sha256 of adapter_model.safetensors when known: the disk cache's content address.
    sha256: str = ""
    size_bytes: int = 0


class AdapterSource(Protocol):
    """Where adapter files come from.

    ``resolve`` turns ``(adapter_id, version)`` into a concrete version (version 0 = latest
    READY) and raises :class:`loraserve.errors.NotFound` for an unknown adapter. ``fetch``
    returns a local PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    whose files are complete and verified; it may download, and is safe to call concurrently
    for different adapters (callers de-duplicate concurrent fetches of the same one).
    """

    async def resolve(self, adapter_id: str, version: int) -> ResolvedAdapter: ...

    async def fetch(self, adapter: ResolvedAdapter) -> Path: ...
