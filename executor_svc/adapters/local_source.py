"""Adapters given as local PEFT directories (``LORASERVE_EXECUTOR_ADAPTER_DIR``, tests).

Layout under ``root``::

    root/<adapter_id>/adapter_config.json        -> version 1
    root/<adapter_id>/<N>/adapter_config.json    -> version N (N = 1, 2, ...)

Version 0 resolves to the highest version present. Nothing is copied: ``fetch`` returns the
directory itself. :class:`ChainSource` tries sources in order, so a local directory can shadow
(or complement) the registry.
"""

from __future__ import annotations

from pathlib import Path

from executor_svc.adapters.refs import AdapterKey, AdapterSource, ResolvedAdapter
from executor_svc.errors import adapter_not_found
from loraserve.errors import NotFound

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class LocalDirSource:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _versions(self, adapter_id: str) -> dict[int, Path]:
        # Adapter ids are [a-z0-9][a-z0-9._-]*: no separators, so the join cannot escape root.
        if not adapter_id or "/" in adapter_id or "\\" in adapter_id or adapter_id in {".", ".."}:
            return {}
        base = self.root / adapter_id
        found: dict[int, Path] = {}
        if (base / CONFIG).is_file():
            found[1] = base
        if base.is_dir():
            for child in base.iterdir():
                if child.name.isdigit() and int(child.name) > 0 and (child / CONFIG).is_file():
                    found[int(child.name)] = child
        return found

    async def resolve(self, adapter_id: str, version: int) -> ResolvedAdapter:
        versions = self._versions(adapter_id)
        if not versions:
            raise adapter_not_found(adapter_id, version, f"not under {self.root}")
        chosen = version or max(versions)
        if chosen not in versions:
            raise adapter_not_found(adapter_id, version)
        path = versions[chosen]
        weights = path / WEIGHTS
        size = weights.stat().st_size if weights.is_file() else 0
        return ResolvedAdapter(AdapterKey(adapter_id, chosen), size_bytes=size)

    async def fetch(self, adapter: ResolvedAdapter) -> Path:
        versions = self._versions(adapter.key.adapter_id)
        if adapter.key.version not in versions:
            raise adapter_not_found(adapter.key.adapter_id, adapter.key.version)
        return versions[adapter.key.version]


class ChainSource:
    """First source that knows the adapter wins; NOT_FOUND falls through to the next."""

    def __init__(self, sources: list[AdapterSource]):
        self.sources = sources
        self._owner: dict[AdapterKey, AdapterSource] = {}

    async def resolve(self, adapter_id: str, version: int) -> ResolvedAdapter:
        last: NotFound | None = None
        for source in self.sources:
            try:
                resolved = await source.resolve(adapter_id, version)
            except NotFound as exc:
                last = exc
                continue
            self._owner[resolved.key] = source
            return resolved
        raise last or adapter_not_found(adapter_id, version, "no adapter source configured")

    async def fetch(self, adapter: ResolvedAdapter) -> Path:
        source = self._owner.get(adapter.key)
        if source is None:  # fetched without a resolve in this process: ask again
            await self.resolve(adapter.key.adapter_id, adapter.key.version)
            source = self._owner[adapter.key]
        return await source.fetch(adapter)
