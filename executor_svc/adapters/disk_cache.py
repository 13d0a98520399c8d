"""Least-recently-used eviction for the executor's adapter disk cache.

Layout (written by :mod:`executor_svc.adapters.registry_client`)::

    <cache>/blobs/<sha256>                       each distinct file once
    <cache>/adapters/<id>@<version>-<sha16>/     hard links to its blobs, named as PEFT expects

An adapter directory's mtime is its last use: every fetch that finds it touches it, and every
blob a fetch reuses is touched too. When the bytes on disk (distinct inodes) exceed the budget,
:func:`evict_lru` removes the least recently used adapter directories, and with each the blobs
that no other directory links, until the cache fits; then blobs that no directory links at all
(left by an interrupted fetch), oldest first.

Never removed: the directory just fetched (``keep``; an adapter larger than the whole budget
stays until the next fetch), and anything used in the last ``min_age_s`` seconds, so a fetch in
progress (its first blob waiting for its second) or a load about to open a directory is safe.
The budget is therefore soft: under heavy churn the cache may exceed it until entries age.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("executor.adapters.disk_cache")


@dataclass(slots=True)
class Eviction:
    removed: list[str] = field(default_factory=list)  # adapter directory names
    orphan_blobs: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def disk_usage(cache_dir: Path) -> int:
    """Bytes of the distinct files under ``cache_dir`` (a hard-linked file counts once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(cache_dir):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:  # removed meanwhile (another fetch's .part)
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def touch(path: Path) -> None:
    """Mark ``path`` as used now (for the LRU order and the ``min_age_s`` guard)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


def evict_lru(
    cache_dir: Path,
    max_bytes: int,
    *,
    keep: Path | None = None,
    min_age_s: float = 300.0,
    now: float | None = None,
) -> Eviction:
    """Remove least recently used adapters (then orphan blobs) until the cache fits."""
    now = time.time() if now is None else now
    result = Eviction(bytes_before=disk_usage(cache_dir))
    used = result.bytes_before
    if max_bytes <= 0 or used <= max_bytes:
        result.bytes_after = used
        return result
    blobs_dir, adapters_dir = cache_dir / "blobs", cache_dir / "adapters"
    blob_by_inode = {
        (st.st_dev, st.st_ino): p
        for p in (blobs_dir.iterdir() if blobs_dir.is_dir() else [])
        if not p.name.startswith(".") and (st := p.stat())
    }
    candidates = sorted(
        (d.stat().st_mtime, d)
        for d in (adapters_dir.iterdir() if adapters_dir.is_dir() else [])
        if d.is_dir() and not d.name.startswith(".") and d != keep
    )
    for mtime, d in candidates:
        if used <= max_bytes:
            break
        if now - mtime < min_age_s:
            break  # sorted by age: every later one is younger still
        used -= _remove_adapter(d, blob_by_inode)
        result.removed.append(d.name)
    if used > max_bytes:  # blobs no adapter links: an interrupted or failed fetch's
        orphans = sorted(
            (st.st_mtime, p, st.st_size)
            for p in blob_by_inode.values()
            if p.exists() and (st := p.stat()).st_nlink == 1
        )
        for mtime, p, size in orphans:
            if used <= max_bytes or now - mtime < min_age_s:
                break
            p.unlink(missing_ok=True)
            used -= size
            result.orphan_blobs += 1
    result.bytes_after = used
    if result.removed or result.orphan_blobs:
        log.info(
            "adapter disk cache evicted",
            extra={
                "adapters": result.removed,
                "orphan_blobs": result.orphan_blobs,
                "bytes_before": result.bytes_before,
                "bytes_after": used,
                "max_bytes": max_bytes,
            },
        )
    return result


def _remove_adapter(adapter_dir: Path, blob_by_inode: dict[tuple[int, int], Path]) -> int:
    """Delete one adapter directory and the blobs only it linked; returns the bytes freed."""
    files = [os.stat(p) for p in adapter_dir.iterdir() if p.is_file()]
    shutil.rmtree(adapter_dir, ignore_errors=True)
    freed = 0
    for st in files:
        blob = blob_by_inode.get((st.st_dev, st.st_ino))
        if blob is None:  # a copy, not a link (another filesystem): gone with the directory
            freed += st.st_size if st.st_nlink == 1 else 0
        elif blob.exists() and blob.stat().st_nlink == 1:  # no other adapter links it
            blob.unlink(missing_ok=True)
            freed += st.st_size
    return freed
