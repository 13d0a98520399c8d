"""Receive a PushAdapter stream: check the header, spool each file while hashing it.

Stream shape: one ``PushAdapterHeader``, then ``FileChunk``s, each file's chunks in offset
order (files one after the other). Everything is checked as it arrives so a bad upload fails at
the first bad byte: names, offsets, per-file caps, declared sizes. On any failure, cancellation
included, the spools are removed (:meth:`Upload.discard` in the caller's ``finally``).

A refusal in mid-stream is sent only after the client has finished sending (the rest is read
and dropped, within :data:`DRAIN_MAX_BYTES` and :data:`DRAIN_MAX_S`). grpc's asyncio client
reports ``INTERNAL: Internal error from Core`` instead of the server's status when one of its
writes fails because the server already ended the call (grpc/grpc#36066), so without the drain
a careless client would see an internal error for e.g. a bad adapter id, at random.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loraserve.api.v1 import registry_pb2
from loraserve.errors import InvalidArgument
from registry_svc.blobstore import BlobStore, Spool
from registry_svc.names import (
    ADAPTER_FILES,
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_adapter_id,
    check_base_model_id,
    check_domain,
    check_file_name,
    check_tag,
)
from registry_svc.settings import RegistrySettings

MAX_DESCRIPTION_CHARS = 4096
DRAIN_MAX_BYTES = 64 << 20
DRAIN_MAX_S = 10.0
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(slots=True)
class Upload:
    header: registry_pb2.PushAdapterHeader
    spools: dict[str, Spool] = field(default_factory=dict)

    def discard(self) -> None:
        for spool in self.spools.values():
            spool.discard()


def file_cap(settings: RegistrySettings, name: str) -> int:
    return settings.max_config_bytes if name == CONFIG_FILE else settings.max_file_bytes


def check_header(h: registry_pb2.PushAdapterHeader, settings: RegistrySettings) -> None:
    """Everything about the header that can be checked before any byte of a file."""
    check_adapter_id(h.adapter_id, "header.adapter_id")
    if h.base_model:
        check_base_model_id(h.base_model, "header.base_model")
    if len(h.tags) > settings.max_tags:
        raise InvalidArgument.field("header.tags", f"more than {settings.max_tags} tags")
    for tag in h.tags:
        check_tag(tag, "header.tags")
    check_domain(h.domain, "header.domain")
    if len(h.description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument.field("header.description", f"over {MAX_DESCRIPTION_CHARS} chars")
    if not h.sample_inputs:
        raise InvalidArgument.field(
            "header.sample_inputs",
            "at least one sample input is required (the adapter is "
            "embedded from the prompts of its task)",
        )
    if len(h.sample_inputs) > settings.max_sample_inputs:
        raise InvalidArgument.field(
            "header.sample_inputs", f"more than {settings.max_sample_inputs} sample inputs"
        )
    for i, text in enumerate(h.sample_inputs):
        if not text.strip() or len(text) > settings.max_sample_input_chars:
            raise InvalidArgument.field(
                f"header.sample_inputs[{i}]",
                f"must be non-blank and at most {settings.max_sample_input_chars} characters",
            )
    seen: set[str] = set()
    for i, info in enumerate(h.files):
        where = f"header.files[{i}]"
        check_file_name(info.name, f"{where}.name")
        if info.name in seen:
            raise InvalidArgument.field(f"{where}.name", f"{info.name} listed twice")
        seen.add(info.name)
        if info.size_bytes > file_cap(settings, info.name):
            raise InvalidArgument.field(
                f"{where}.size_bytes",
                f"{info.name} of {info.size_bytes} bytes is over the cap of "
                f"{file_cap(settings, info.name)} bytes",
            )
        if info.sha256 and not _SHA256.fullmatch(info.sha256):
            raise InvalidArgument.field(f"{where}.sha256", "must be 64 lowercase hex digits")


async def receive_upload(
    requests: AsyncIterator[registry_pb2.PushAdapterRequest],
    settings: RegistrySettings,
    blobs: BlobStore,
) -> Upload:
    """Read the whole stream into spools; the caller must ``discard()`` the result."""
    try:
        first = await anext(aiter(requests))
    except StopAsyncIteration:
        first = None
    if first is None or not first.HasField("header"):
        if first is not None:
            await _drain(requests)
        raise InvalidArgument.field("header", "the first message of an upload must be its header")
    upload = Upload(header=first.header)
    try:
        try:
            check_header(upload.header, settings)
            declared = {f.name: f for f in upload.header.files}
            async for req in requests:
                if not req.HasField("chunk"):
                    raise InvalidArgument.field("header", "only the first message may be a header")
                await _append(upload, req.chunk, declared, settings, blobs)
        except InvalidArgument:
            upload.discard()  # the spools go before the drain, not after it
            await _drain(requests)
            raise
        _check_complete(upload, declared)
        return upload
    except BaseException:
        upload.discard()
        raise


async def _drain(requests: AsyncIterator[registry_pb2.PushAdapterRequest]) -> None:
    """Read and drop the rest of a refused stream, so the refusal reaches an asyncio client.

    Bounded: a client that keeps sending past :data:`DRAIN_MAX_BYTES` or :data:`DRAIN_MAX_S`
    gets the refusal then (and may see it as an internal error; see the module docstring).
    """
    received = 0
    try:
        async with asyncio.timeout(DRAIN_MAX_S):
            async for req in requests:
                received += req.ByteSize()
                if received > DRAIN_MAX_BYTES:
                    return
    except Exception:  # the timeout, or a broken stream: the refusal is all that is left to send
        return


async def _append(
    upload: Upload,
    chunk: registry_pb2.FileChunk,
    declared: dict,
    settings: RegistrySettings,
    blobs: BlobStore,
) -> None:
    name = check_file_name(chunk.file_name, "chunk.file_name")
    spool = upload.spools.get(name)
    if spool is None:
        spool = upload.spools[name] = blobs.spool()
    if chunk.offset != spool.size:
        raise InvalidArgument.field(
            "chunk.offset", f"{name}: chunk at offset {chunk.offset}, expected {spool.size}"
        )
    end = spool.size + len(chunk.data)
    cap = file_cap(settings, name)
    if end > cap:
        raise InvalidArgument.field("chunk.data", f"{name} is over the cap of {cap} bytes")
    if name in declared and end > declared[name].size_bytes:
        raise InvalidArgument.field(
            "chunk.data", f"{name} is longer than its declared {declared[name].size_bytes} bytes"
        )
    if len(chunk.data) >= 1 << 16:  # hashing + writing a big chunk: keep the event loop free
        await asyncio.to_thread(spool.write, chunk.data)
    else:
        spool.write(chunk.data)


def _check_complete(upload: Upload, declared: dict) -> None:
    for name in ADAPTER_FILES:
        if name not in upload.spools:
            raise InvalidArgument.field(name, "missing from the upload")
    for name, info in declared.items():
        spool = upload.spools[name]
        if spool.size != info.size_bytes:
            raise InvalidArgument.field(
                name,
                f"upload incomplete: {spool.size} of {info.size_bytes} bytes received",
            )
        if info.sha256 and spool.hexdigest() != info.sha256:
            raise InvalidArgument.field(name, "sha256 of the received bytes does not match")
    if upload.spools[WEIGHTS_FILE].size == 0:
        raise InvalidArgument.field(WEIGHTS_FILE, "is empty")
