"""DownloadAdapter: stream a READY version's files, resumable by offset, verified by sha256.

Per file: one ``DownloadFileStart`` (the adapter and the file's name, size, sha256), then
chunks with their offsets. A client that lost the connection asks again for that file from the
offset it has; it checks the whole file against ``FileInfo.sha256``. When a file is sent from
offset 0 the server hashes it on the way and aborts if the stored blob does not match.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from loraserve.api.v1 import common_pb2, registry_pb2
from loraserve.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from registry_svc.context import RegistryContext
from registry_svc.convert import READY, adapter_to_proto
from registry_svc.names import ADAPTER_FILES, check_adapter_id, check_file_name
from registry_svc.store import get_adapter

DEFAULT_CHUNK = 1 << 20
MAX_CHUNK = 4 << 20


async def download_adapter(
    ctx: RegistryContext, req: registry_pb2.DownloadAdapterRequest
) -> AsyncIterator[registry_pb2.DownloadAdapterResponse]:
    check_adapter_id(req.adapter_id)
    if req.offset and not req.file_name:
        raise InvalidArgument.field("offset", "is only allowed together with file_name")
    names = [check_file_name(req.file_name)] if req.file_name else list(ADAPTER_FILES)
    chunk_size = min(req.chunk_size or DEFAULT_CHUNK, MAX_CHUNK)
    row = await asyncio.to_thread(
        get_adapter, ctx.db, req.adapter_id, req.version, ready_only=not req.version
    )
    if row is None:
        what = f"{req.adapter_id}@{req.version}" if req.version else f"{req.adapter_id} (READY)"
        raise NotFound(f"adapter {what} not found", resource_type="adapter", resource_name=what)
    if row.status != READY:
        raise FailedPrecondition(
            f"adapter {row.adapter_id}@{row.version} is {row.status}; only READY is downloadable"
        )
    adapter = adapter_to_proto(row)
    files = {f["name"]: f for f in row.files}
    for name in names:
        f = files[name]
        if req.offset > f["size"]:
            raise InvalidArgument.field("offset", f"{req.offset} is past the end of {name}")
        info = common_pb2.FileInfo(name=name, size_bytes=f["size"], sha256=f["sha256"])
        yield registry_pb2.DownloadAdapterResponse(
            file_start=registry_pb2.DownloadFileStart(adapter=adapter, file=info)
        )
        async for chunk in _chunks(ctx, name, f["sha256"], req.offset, chunk_size):
            yield registry_pb2.DownloadAdapterResponse(chunk=chunk)


async def _chunks(
    ctx: RegistryContext, name: str, sha256: str, offset: int, chunk_size: int
) -> AsyncIterator[common_pb2.FileChunk]:
    path = ctx.blobs.path_for(sha256)
    digest = hashlib.sha256() if offset == 0 else None
    try:
        f = await asyncio.to_thread(path.open, "rb")
    except FileNotFoundError:
        raise Internal(f"blob of {name} is missing from the store") from None
    try:
        f.seek(offset)
        while data := await asyncio.to_thread(f.read, chunk_size):
            if digest is not None:
                digest.update(data)
            yield common_pb2.FileChunk(file_name=name, offset=offset, data=data)
            offset += len(data)
    finally:
        f.close()
    if digest is not None and digest.hexdigest() != sha256:
        raise Internal(f"stored blob of {name} is corrupted (sha256 mismatch)")
