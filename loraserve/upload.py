"""Client side of ``RegistryService.PushAdapter``: the request stream for an adapter directory.

Owned by the registry; the SDK (``Client.push_adapter``) and ``loraserve push`` use it::

    header = registry_pb2.PushAdapterHeader(adapter_id="sql-gen", sample_inputs=[...])
    stub.PushAdapter(iter_push_requests("out/sql-gen", header, on_progress=bar.update_to))

The generator hashes both files first (the server checks sizes and sha256 against the header),
then yields the header and the files as chunks of ``chunk_size`` bytes, in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

from loraserve.api.v1 import common_pb2, registry_pb2

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Messages are capped at 8 MiB by the servers; 1 MiB chunks measured fastest over loopback.
MAX_CHUNK_SIZE = 4 << 20


def adapter_files(adapter_dir: str | Path) -> list[Path]:
    """The two files of a PEFT adapter directory; refuses pickle-only adapters up front."""
    root = Path(adapter_dir)
    paths = [root / name for name in ADAPTER_FILES]
    if not paths[1].is_file() and (root / "adapter_model.bin").is_file():
        raise ValueError(
            f"{root}: adapter_model.bin (pickle) is not accepted; save with safetensors "
            "(model.save_pretrained(dir, safe_serialization=True))"
        )
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
    return paths


def file_info(path: Path) -> common_pb2.FileInfo:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
            size += len(data)
    return common_pb2.FileInfo(name=path.name, size_bytes=size, sha256=h.hexdigest())


def iter_push_requests(
    adapter_dir: str | Path,
    header: registry_pb2.PushAdapterHeader,
    chunk_size: int = 1 << 20,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[registry_pb2.PushAdapterRequest]:
    """Yield the PushAdapter stream for ``adapter_dir``.

    ``header.files`` is filled in (name, size, sha256) when empty; the caller's header is not
    modified. ``on_progress(bytes_sent, bytes_total)`` is called after every chunk.
    """
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
    paths = adapter_files(adapter_dir)
    out = registry_pb2.PushAdapterHeader()
    out.CopyFrom(header)
    if not out.files:
        out.files.extend(file_info(p) for p in paths)
    total = sum(f.size_bytes for f in out.files)
    yield registry_pb2.PushAdapterRequest(header=out)
    sent = 0
    if on_progress:
        on_progress(0, total)
    for path in paths:
        with path.open("rb") as f:
            offset = 0
            while data := f.read(chunk_size):
                yield registry_pb2.PushAdapterRequest(
                    chunk=common_pb2.FileChunk(file_name=path.name, offset=offset, data=data)
                )
                offset += len(data)
                sent += len(data)
                if on_progress:
                    on_progress(sent, total)
