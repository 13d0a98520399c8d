"""Fetch adapters from the registry into a content-addressed disk cache.

``resolve`` asks GetAdapter (version 0 = latest READY: when the latest version is not READY yet,
ListAdapters finds the highest READY one). ``fetch`` downloads each file with its own
DownloadAdapter stream (server-streaming) into ``<cache>/blobs/<sha256>``:

- resumable: a stream that breaks (UNAVAILABLE, reset, deadline) is re-opened with
  ``file_name`` + ``offset`` = bytes already written, up to ``max_attempts`` times with backoff;
- verified: size and sha256 must match the registry's FileInfo (from GetAdapter or the
  stream's ``file_start``), else the partial file is dropped and the fetch fails UNAVAILABLE;
- atomic: bytes go to a ``.part`` file, renamed into ``blobs/`` only once verified; the adapter's
  directory (hard links to its blobs, named as PEFT expects) is built under a temporary name
  and renamed into place, so a crash never leaves a half-written adapter that looks complete.

Identical files (e.g. the same adapter_config.json in many versions) are stored once. NOT_FOUND
and permission errors from the registry propagate as they are; they are not retried. With a
byte budget (``max_bytes``), each new download is followed by an LRU eviction of the cache
(:mod:`executor_svc.adapters.disk_cache`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

import grpc

from executor_svc.adapters.disk_cache import evict_lru, touch
from executor_svc.adapters.local_source import CONFIG, WEIGHTS
from executor_svc.adapters.refs import AdapterKey, ResolvedAdapter
from executor_svc.errors import adapter_not_found, fetch_failed
from loraserve.api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from loraserve.errors import from_rpc_error

log = logging.getLogger("executor.adapters.registry")

# Codes that mean "retrying the same call will not help": surface them to the caller at once.
_FINAL_CODES = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
_READY = common_pb2.ADAPTER_STATUS_READY


class RegistrySource:
    """An :class:`~executor_svc.adapters.refs.AdapterSource` backed by RegistryService."""

    def __init__(
        self,
        address: str,
        cache_dir: str | Path,
        *,
        token: str = "",
        chunk_size: int = 1 << 20,
        max_attempts: int = 5,
        rpc_timeout_s: float = 60.0,
        max_bytes: int = 0,
        min_age_s: float = 300.0,
    ):
        """``max_bytes``: disk budget of the cache, least recently used adapters evicted
        first (0 = unbounded); nothing used in the last ``min_age_s`` seconds is evicted."""
        self.address = address
        self.cache_dir = Path(cache_dir)
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._chunk_size = chunk_size
        self._max_attempts = max_attempts
        self._timeout = rpc_timeout_s
        self._max_bytes, self._min_age_s = max_bytes, min_age_s
        self._channel: grpc.aio.Channel | None = None
        self._files: dict[AdapterKey, list[common_pb2.FileInfo]] = {}

    @property
    def _stub(self) -> registry_pb2_grpc.RegistryServiceStub:
        # Created lazily: an aio channel belongs to the event loop that first uses it.
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return registry_pb2_grpc.RegistryServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def resolve(self, adapter_id: str, version: int) -> ResolvedAdapter:
        adapter = await self._get(adapter_id, version)
        if adapter.status != _READY:
            if version:
                status = common_pb2.AdapterStatus.Name(adapter.status)
                raise adapter_not_found(adapter_id, version, f"status {status}, not READY")
            adapter = await self._latest_ready(adapter_id)
        key = AdapterKey(adapter.adapter_id, adapter.version)
        self._files[key] = list(adapter.metadata.files)
        md = adapter.metadata
        return ResolvedAdapter(key, sha256=md.sha256, size_bytes=md.size_bytes)

    async def _get(self, adapter_id: str, version: int) -> common_pb2.Adapter:
        request = registry_pb2.GetAdapterRequest(adapter_id=adapter_id, version=version)
        try:
            response = await self._stub.GetAdapter(
                request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise adapter_not_found(adapter_id, version, "unknown to the registry") from exc
            if exc.code() in _FINAL_CODES:
                raise from_rpc_error(exc) from exc
            raise fetch_failed(adapter_id, f"registry GetAdapter: {exc.code().name}") from exc
        return response.adapter

    async def _latest_ready(self, adapter_id: str) -> common_pb2.Adapter:
        flt = registry_pb2.AdapterFilter(adapter_id_prefix=adapter_id, statuses=[_READY])
        best: common_pb2.Adapter | None = None
        token = ""
        while True:
            page = await self._stub.ListAdapters(
                registry_pb2.ListAdaptersRequest(filter=flt, page_size=1000, page_token=token),
                metadata=self._metadata,
                timeout=self._timeout,
            )
            for a in page.adapters:  # a prefix filter also matches longer ids: keep exact ones
                if a.adapter_id == adapter_id and (best is None or a.version > best.version):
                    best = a
            token = page.next_page_token
            if not token:
                break
        if best is None:
            raise adapter_not_found(adapter_id, 0, "no READY version")
        return best

    async def fetch(self, adapter: ResolvedAdapter) -> Path:
        key = adapter.key
        suffix = f"-{adapter.sha256[:16]}" if adapter.sha256 else ""
        final = self.cache_dir / "adapters" / f"{key.adapter_id}@{key.version}{suffix}"
        if final.is_dir():  # only complete directories ever get this name
            touch(final)  # most recently used: the last to be evicted
            return final
        files = self._files.get(key) or [
            # GetAdapter listed no files: ask for the two PEFT files; sizes and digests then
            # come from each stream's file_start.
            common_pb2.FileInfo(name=CONFIG),
            common_pb2.FileInfo(name=WEIGHTS),
        ]
        blobs = [(info.name, await self._download_file(key, info)) for info in files]
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for name, blob in blobs:
                _link_or_copy(blob, tmp / os.path.basename(name))
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():  # lost a race with another fetch of the same adapter: fine
                raise
        log.info("adapter cached", extra={"adapter": str(key), "path": str(final)})
        if self._max_bytes:
            try:
                await asyncio.to_thread(
                    evict_lru,
                    self.cache_dir,
                    self._max_bytes,
                    keep=final,
                    min_age_s=self._min_age_s,
                )
            except OSError as exc:  # the adapter is in place; a failed clean-up can wait
                log.warning("disk cache eviction failed", extra={"error": repr(exc)})
        return final

    async def _download_file(self, key: AdapterKey, info: common_pb2.FileInfo) -> Path:
        blobs = self.cache_dir / "blobs"
        if info.sha256 and (blobs / info.sha256).is_file():
            touch(blobs / info.sha256)  # in use: not evicted before it is linked
            return blobs / info.sha256
        blobs.mkdir(parents=True, exist_ok=True)
        part = blobs / f".{uuid.uuid4().hex}.part"
        expected_sha, expected_size = info.sha256, info.size_bytes
        digest = hashlib.sha256()
        offset, attempt = 0, 0
        try:
            with part.open("wb") as out:
                while True:
                    request = registry_pb2.DownloadAdapterRequest(
                        adapter_id=key.adapter_id,
                        version=key.version,
                        file_name=info.name,
                        offset=offset,
                        chunk_size=self._chunk_size,
                    )
                    try:
                        call = self._stub.DownloadAdapter(
                            request, metadata=self._metadata, timeout=self._timeout
                        )
                        async for msg in call:
                            if msg.HasField("file_start"):
                                expected_sha = expected_sha or msg.file_start.file.sha256
                                expected_size = expected_size or msg.file_start.file.size_bytes
                                continue
                            if msg.chunk.offset != offset:
                                raise fetch_failed(str(key), f"{info.name}: chunk out of order")
                            out.write(msg.chunk.data)
                            digest.update(msg.chunk.data)
                            offset += len(msg.chunk.data)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.NOT_FOUND:
                            raise adapter_not_found(key.adapter_id, key.version) from exc
                        if exc.code() in _FINAL_CODES:
                            raise from_rpc_error(exc) from exc
                        attempt += 1
                        if attempt >= self._max_attempts:
                            raise fetch_failed(str(key), f"{info.name}: {exc.code().name}") from exc
                        log.warning(
                            "download broke, resuming",
                            extra={"adapter": str(key), "file": info.name, "offset": offset},
                        )
                        await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
            sha = digest.hexdigest()
            if not expected_sha:
                raise fetch_failed(str(key), f"{info.name}: registry sent no sha256")
            if sha != expected_sha or (expected_size and offset != expected_size):
                raise fetch_failed(
                    str(key), f"{info.name}: sha256/size mismatch ({offset} bytes, {sha[:12]})"
                )
            blob = blobs / sha
            os.replace(part, blob)
            return blob
        finally:
            part.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(src, dst)
