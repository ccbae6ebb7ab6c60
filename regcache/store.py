"""
The content store: every blob and manifest on disk, by digest.

Layout under the storage root::

    blobs/<alg>/<2 hex>/<hex>        the exact bytes, manifests included
    manifests/<alg>/<2 hex>/<hex>    the upstream Content-Type of a manifest
    tmp/                             downloads in progress

The promise is simple: a file under ``blobs/`` is complete and matches its
name.  Bytes reach it only through a temp file on the same filesystem that was
hashed while it was written, fsync'd, and renamed into place after the digest
and length matched.  A crash leaves at worst a temp file, which start-up
removes.  The filesystem is the metadata: sizes and access times come from
``stat``, so nothing can disagree with the files.
"""

import errno
import os
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from regcache.reference import Digest

#: A runner for blocking work: takes f and args, returns a Deferred of the
#: result.  Production passes a bounded thread pool; tests run inline.
Runner = Callable[..., Deferred]

MAX_MANIFEST = 4 * 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: Digest

    @property
    def size(self) -> int:
        return len(self.body)


class BlobWriter:
    """
    One blob on its way into the store.  It is written and hashed as bytes
    arrive, and becomes visible only through ``commit`` once it proved to be
    exactly the blob its digest names.
    """

    def __init__(self, store: "Store", digest: Digest):
        self.store = store
        self.digest = digest
        self.path = os.path.join(store.tmp_dir, f"{digest.hex}.{uuid.uuid4().hex}")
        # O_RDWR so readers can be handed dups of this descriptor: they then
        # never depend on the temp file's name, which vanishes at commit.
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.length = 0
        self.closed = False
        self._hasher = digest.hasher()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self._hasher.update(data)
        self.length += len(data)

    def matches(self, size: Optional[int]) -> bool:
        """
        Whether what was written is the blob the digest names.
        """
        if size is not None and self.length != size:
            return False
        return self._hasher.hexdigest() == self.digest.hex

    def reader(self) -> int:
        """
        A descriptor of its own for a reader, valid after commit and discard.
        """
        return os.dup(self.fd)

    def commit(self) -> Deferred:
        """
        fsync and rename into place, in a thread.  The descriptor stays open
        (readers may still be taking dups of it) until ``close``.
        """
        return self.store._run(self.store._commit_file, self.fd, self.path, self.store.blob_path(self.digest))

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class Store:
    """
    Blobs and manifests by digest on a local filesystem.
    """

    log = Logger()

    def __init__(self, root: str, run: Runner, now: Callable[[], float]):
        self.root = root
        self.tmp_dir = os.path.join(root, "tmp")
        self._run = run
        self._now = now
        self._manifests: Dict[Digest, Manifest] = {}
        self._manifest_bytes = 0
        self.memory_limit = 64 * 1024 * 1024

    def prepare(self) -> int:
        """
        Create the layout and remove what a crash left in tmp/.  Runs before
        the port opens; returns how many leftovers were removed.
        """
        for sub in ("blobs", "manifests", "tags", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                os.unlink(entry.path)
                removed += 1
            except IsADirectoryError:
                pass
        probe = os.path.join(self.tmp_dir, f"probe.{uuid.uuid4().hex}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
        return removed

    # Paths

    def _path(self, kind: str, digest: Digest) -> str:
        return os.path.join(self.root, kind, digest.algorithm, digest.hex[:2], digest.hex)

    def blob_path(self, digest: Digest) -> str:
        return self._path("blobs", digest)

    # Blobs

    def open_blob(self, digest: Digest) -> Optional[tuple]:
        """
        (fd, size) of a complete blob, or None.  The caller owns the fd.
        """
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        size = os.fstat(fd).st_size
        return fd, size

    def blob_size(self, digest: Digest) -> Optional[int]:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    def new_writer(self, digest: Digest) -> BlobWriter:
        return BlobWriter(self, digest)

    def _commit_file(self, fd: int, tmp: str, final: str) -> None:
        """
        Make a verified temp file durable and visible under its final name.
        Runs in a thread: fsync can take long.
        """
        os.fsync(fd)
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        os.rename(tmp, final)
        _fsync_dir(directory)

    # Manifests

    def manifest(self, digest: Digest) -> Optional[Manifest]:
        """
        A cached manifest: from memory if it was used lately, else from disk.
        Manifests are small (at most 4 MiB), so reading one is not a whole-
        blob read.
        """
        m = self._manifests.get(digest)
        if m is not None:
            return m
        try:
            with open(self._path("manifests", digest), "r", encoding="utf-8") as f:
                media_type = f.read().strip()
            with open(self.blob_path(digest), "rb") as f:
                body = f.read(MAX_MANIFEST + 1)
        except FileNotFoundError:
            return None
        if len(body) > MAX_MANIFEST:
            return None
        m = Manifest(body, media_type, digest)
        self._remember(m)
        return m

    def put_manifest(self, manifest: Manifest) -> Deferred:
        """
        Store a manifest whose bytes were already checked against its digest.
        The type record is written before the body, so a body under blobs/
        that is a manifest always has its type.
        """
        self._remember(manifest)
        return self._run(self._write_manifest, manifest)

    def _write_manifest(self, m: Manifest) -> None:
        self._write_atomic(self._path("manifests", m.digest), m.media_type.encode("utf-8"))
        if not os.path.exists(self.blob_path(m.digest)):
            self._write_atomic(self.blob_path(m.digest), m.body)

    def _write_atomic(self, final: str, data: bytes) -> None:
        tmp = os.path.join(self.tmp_dir, f"w.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._commit_file(fd, tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)

    def _remember(self, m: Manifest) -> None:
        if m.digest in self._manifests:
            return
        while self._manifests and self._manifest_bytes + m.size > self.memory_limit:
            old = self._manifests.pop(next(iter(self._manifests)))
            self._manifest_bytes -= old.size
        self._manifests[m.digest] = m
        self._manifest_bytes += m.size


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
