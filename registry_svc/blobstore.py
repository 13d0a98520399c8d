"""Content-addressed blob store on the filesystem: ``<root>/sha256/<ab>/<sha256 hex>``.

Uploads are spooled to ``<root>/tmp`` while they are hashed, then fsynced and atomically
renamed to their address, so a blob is either absent or complete. Identical bytes are stored
once. Client-chosen names never reach a path: the only path component we build from input is a
sha256 we computed (and :meth:`BlobStore.path_for` re-checks it is 64 hex digits).

Garbage collection deletes blobs no live record uses. ``lock`` serialises "commit blob, then
insert the record that uses it" against GC inside this process; across processes a grace
period on the blob's mtime (refreshed on every commit) keeps a blob whose record is not yet
written.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

_SHA256 = re.compile(r"[0-9a-f]{64}")


class Spool:
    """A temp file that hashes what is written to it."""

    def __init__(self, tmp_dir: Path):
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=tmp_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.committed = False

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Flush and fsync; the file stays open-able for validation."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def discard(self) -> None:
        """Remove the temp file (safe to call twice, and after commit)."""
        if not self._file.closed:
            self._file.close()
        if not self.committed:
            self.path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blob_dir = self.root / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
        return self.blob_dir / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def spool(self) -> Spool:
        return Spool(self.tmp_dir)

    def commit(self, spool: Spool) -> str:
        """Move a finished spool to its address; returns the sha256. Dedupes identical bytes."""
        spool.finish()
        sha = spool.hexdigest()
        target = self.path_for(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and target.stat().st_size == spool.size:
            spool.discard()
            os.utime(target)  # restart its GC grace period
        else:
            os.replace(spool.path, target)
            _fsync_dir(target.parent)
        spool.committed = True
        return sha

    def put_bytes(self, data: bytes) -> str:
        spool = self.spool()
        try:
            spool.write(data)
            return self.commit(spool)
        finally:
            spool.discard()

    def iter_shas(self) -> Iterator[str]:
        for sub in self.blob_dir.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if _SHA256.fullmatch(f.name):
                        yield f.name

    def delete_unreferenced(
        self,
        referenced: Iterable[str],
        *,
        candidates: Iterable[str] | None = None,
        grace_s: float = 0.0,
    ) -> list[str]:
        """Delete blobs (all, or only ``candidates``) not in ``referenced`` and older than
        ``grace_s``. Call with ``lock`` held when records are read in this process."""
        keep = set(referenced)
        now = time.time()
        removed = []
        for sha in list(candidates if candidates is not None else self.iter_shas()):
            if sha in keep:
                continue
            path = self.path_for(sha)
            try:
                if grace_s and now - path.stat().st_mtime < grace_s:
                    continue
                path.unlink()
                removed.append(sha)
            except FileNotFoundError:
                continue
        return removed

    def cleanup_tmp(self, older_than_s: float = 3600.0) -> int:
        """Remove spools left by a crashed process."""
        now, n = time.time(), 0
        for f in self.tmp_dir.iterdir():
            try:
                if now - f.stat().st_mtime > older_than_s:
                    f.unlink()
                    n += 1
            except FileNotFoundError:
                continue
        return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
