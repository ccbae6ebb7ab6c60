# test-case-name: tests.test_store,tests.test_expiry
"""
The content store: every blob and manifest on disk, by digest.

Layout under the storage root::

    blobs/<alg>/<2 hex>/<hex>        the exact bytes, manifests included
    manifests/<alg>/<2 hex>/<hex>    the upstream Content-Type of a manifest
    links/<alg>/<2 hex>/<hex>        the repositories that hold it (regcache.links)
    tmp/                             downloads in progress

The promise is simple: a file under ``blobs/`` is complete and matches its
name.  Bytes reach it only through a temp file on the same filesystem that was
hashed while it was written, fsync'd, and renamed into place after the digest
and length matched.  A crash leaves at worst a temp file, which start-up
removes.  The filesystem is the metadata: sizes and access times come from
``stat``, so nothing can disagree with the files.  The in-memory index that
eviction needs (regcache.index) is rebuilt from them at every start.

Manifests go further, being small: each one read from disk is hashed again,
and one kept in memory is served only while its file is unchanged, so a
manifest that rotted, was edited, or was removed by ``regcache verify`` is
a miss, never a wrong answer.

A manifest's body is written before its type record, and on eviction the
record is deleted before the body: a type record always has its body, and a
crash in between leaves at worst a body without a record, which is served as
a blob and fetched again as a manifest.

A link is written only while its data is there, and on eviction it is
deleted before the data and after every link write under way: a crash
leaves at worst content without links, which is linked again on first use.

Running out of space is survivable: a blob write that fails with ENOSPC
fails its fill (readers see an aborted connection, the temp file goes) and
asks for an eviction; a manifest that cannot be stored is still answered
from memory.
"""

import ctypes
import errno
import hashlib
import os
import re
import stat
import uuid
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from regcache import links
from regcache.errors import BlobTooLarge
from regcache.index import BLOB, MANIFEST, Entry, Index, Scan, add_referrer
from regcache.links import RepoKey
from regcache.manifests import MAX_MANIFEST, Manifest, references
from regcache.reference import ALGORITHMS, Digest

#: A runner for blocking work: takes f and args, returns a Deferred of the
#: result.  Production passes a bounded thread pool; tests run inline.
Runner = Callable[..., Deferred]

#: One version of a file: (inode, mtime in ns, size).
Identity = Tuple[int, int, int]


def _identity(st: os.stat_result) -> Identity:
    return st.st_ino, st.st_mtime_ns, st.st_size


#: Seconds a manifest held in memory is served before its file is looked
#: at again (one ``stat`` in the runner).  Its bytes were verified when
#: they were read or fetched, so this bounds only how long a file that
#: ``regcache verify`` or a hand removed goes unnoticed, while a hot
#: manifest costs the runner one round trip a second, not one a request.
RECHECK = 1.0


@dataclass
class _Held:
    """A manifest in memory."""

    manifest: Manifest
    #: Of the file it was read from or written to; None while it is in
    #: memory only (being written, or the disk could not take it).
    identity: Optional[Identity]
    #: Clock seconds when ``identity`` was last found to be the file's.
    checked: float = 0.0


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
        #: The size upstream announced, 0 until it did.
        self._announced = 0
        #: What the index counts for this download (see Index.writing), and
        #: the bytes actually on disk.
        self._counted = 0
        self._on_disk = 0
        #: The repositories to link the blob to once it lands.
        self.links: List[RepoKey] = []

    def reserve(self, size: int) -> None:
        """
        The blob will be ``size`` bytes.  One larger than the cache's limit
        is refused now, before anything is evicted for it.  Otherwise it is
        counted a step ahead of its bytes (``Index.ahead``), so that
        eviction makes room before they arrive, yet a length that lies
        cannot evict more than that step beyond what really came.
        """
        self._fits(size)
        self._announced = size
        self._count(0)

    def _fits(self, size: int) -> None:
        limit = self.store.index.limit
        if limit is not None and size > limit:
            raise BlobTooLarge(self.digest, size, limit)

    def _count(self, written: int) -> None:
        self._on_disk += written
        counted = max(self._on_disk, min(self._announced, self._on_disk + self.store.index.ahead))
        extra = max(counted - self._counted, 0)
        self._counted += extra
        self.store.index.grow(extra, written)

    def write(self, data: bytes) -> None:
        """
        Append ``data``.  A blob of unknown length is refused as it passes
        the cache's limit.
        """
        self._fits(self.length + len(data))
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self._count(n)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.store.index.on_full()
            raise
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
        fsync and rename into place, in a thread, once any eviction of the
        same digest has deleted the old file.  The digest is pinned until
        the new file is indexed: an eviction chosen meanwhile from the old
        file's entry would delete the new file.  The descriptor stays open
        (readers may still be taking dups of it) until ``close``.
        """
        store = self.store
        release = store.pin(self.digest)
        d = store._after_delete(self.digest)
        d.addCallback(lambda _: store._run(store._commit_file, self.fd, self.path, store.blob_path(self.digest)))
        d.addCallbacks(self._landed, store._write_failed)
        d.addBoth(lambda result: (release(), result)[1])
        return d

    def room(self) -> Optional[Deferred]:
        """See Index.room: whether to pause the download for evictions."""
        return self.store.index.room()

    def _landed(self, _) -> None:
        self._uncount()
        self.store.index.add(self.digest, self.length, BLOB)
        for key in self.links:
            self.store.link(self.digest, key)

    def _uncount(self) -> None:
        if self._counted or self._on_disk:
            self.store.index.grow(-self._counted, -self._on_disk)
            self._counted = self._on_disk = 0

    def discard(self) -> None:
        self._uncount()
        self.store._writer_done(self)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._uncount()
        self.store._writer_done(self)
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
        self._manifests: "OrderedDict[Digest, _Held]" = OrderedDict()
        self._manifest_bytes = 0
        self.memory_limit = 64 * 1024 * 1024
        self.index = Index(now)
        #: Digests whose files an eviction is deleting -> who waits for that.
        self._deleting: Dict[Digest, List[Deferred]] = {}
        #: The blob writer of each download under way.
        self._writers: Dict[Digest, BlobWriter] = {}
        #: The end of the last deletion under way (Store.delete), if any.
        self._deletion: Optional[Deferred] = None
        #: Digests with link writes under way -> the last one's end.
        self._link_writes: Dict[Digest, Deferred] = {}
        #: Told of each link recorded, to share it (regcache.sharedmeta's
        #: ``link``), when there is a shared level.
        self.on_link: Optional[Callable[[Digest, RepoKey], None]] = None

    def prepare(self) -> int:
        """
        Create the layout and remove what a crash left in tmp/.  Runs before
        the port opens; returns how many leftovers were removed.
        """
        for sub in ("blobs", "links", "manifests", "tags", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                os.unlink(entry.path)
                removed += 1
            except IsADirectoryError:
                pass
        probe = os.path.join(self.tmp_dir, f"probe.{uuid.uuid4().hex}")
        try:
            with open(probe, "wb") as f:
                f.write(b"ok")
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # Writable but full: start anyway; the first write that fails
            # makes the evictor free room.
            self.log.warn("The cache's disk is full at start-up: {root}", root=self.root)
        finally:
            if os.path.exists(probe):
                os.unlink(probe)
        return removed

    def free_space(self) -> Deferred:
        """A Deferred of the bytes free to the cache on its filesystem."""
        return self._run(_free_bytes, self.root)

    # Paths

    def _path(self, kind: str, digest: Digest) -> str:
        return os.path.join(self.root, kind, digest.algorithm, digest.hex[:2], digest.hex)

    def blob_path(self, digest: Digest) -> str:
        return self._path("blobs", digest)

    # Blobs

    def open_blob(self, digest: Digest) -> Optional[tuple]:
        """
        (fd, size) of a complete blob, or None.  The caller owns the fd.

        Only a missing file is a missing blob.  Any other failure to open
        it (no descriptor left, a permission or I/O error) says nothing
        about the bytes, so it is raised and the entry stays: dropping it
        would turn a moment of descriptor exhaustion into lost cache.

        A file whose size is not the one recorded for it (at commit, or the
        size a cached manifest declares) is treated as missing: it leaves
        the index and the disk, so no later eviction of its entry can take
        the new copy that is fetched in its place.
        """
        if digest in self._deleting:
            return None
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            self.index.remove(digest)
            return None
        except OSError as e:
            self.log.warn("Cannot open cached {path}: {error}", path=path, error=e.strerror)
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            # A directory (or worse) where the file belongs, put there by
            # hand: no bytes to serve.  Fetched again; storing the new copy
            # fails until someone clears the way, and says so.
            os.close(fd)
            self.log.warn("Not a file where {digest} belongs: {path}", digest=str(digest), path=path)
            self.index.remove(digest)
            return None
        size = st.st_size
        entry = self.index.get(digest)
        if entry is not None and entry.size != size:
            os.close(fd)
            self.log.warn(
                "Cached {digest} has {actual} bytes, not {expected}: fetching it again",
                digest=str(digest), actual=size, expected=entry.size,
            )
            self._discard(digest, entry)
            return None
        self._used(digest)
        return fd, size

    def pin(self, digest: Digest) -> Callable[[], None]:
        """
        Keep ``digest`` from eviction while a client reads it; call the
        returned function when done.
        """
        return self.index.pin(digest)

    def _used(self, digest: Digest) -> None:
        touch = self.index.use(digest)
        if touch:
            d = self._run(_touch, [self.blob_path(t) for t in touch], self._now())
            d.addErrback(lambda f: self.log.failure("Recording the use of {digest} failed", f,
                                                    digest=str(digest)))

    def new_writer(self, digest: Digest) -> BlobWriter:
        writer = self._writers[digest] = BlobWriter(self, digest)
        return writer

    def _writer_done(self, writer: BlobWriter) -> None:
        if self._writers.get(writer.digest) is writer:
            del self._writers[writer.digest]

    # Links

    def linked(self, digest: Digest, key: RepoKey) -> Deferred:
        """
        A Deferred of whether the repository ``key`` is known to hold
        ``digest``: linked to it, or named by a manifest linked to it (a
        link from then on).  From memory for the links used lately;
        otherwise the links files of the digest and of the manifests that
        name it (at most Index.MAX_NAMING of them: past that upstream is
        asked) are read in the runner.
        """
        known = self.index.links
        if known.has(digest, key):
            return succeed(True)
        naming = self.index.naming(digest)
        for manifest in naming:
            if known.has(manifest, key):
                self.link(digest, key)
                return succeed(True)

        def found(holder: Optional[int]) -> bool:
            if holder is None:
                return False
            if holder == 0:
                if digest not in self._deleting:
                    known.add(digest, key)
                return True
            if naming[holder - 1] not in self._deleting:
                known.add(naming[holder - 1], key)
            self.link(digest, key)
            return True

        paths = [self._path("links", d) for d in [digest] + naming]
        return self._run(links.first_holding, paths, key).addCallback(found)

    def link(self, digest: Digest, key: RepoKey) -> None:
        """
        Record that the repository ``key`` holds ``digest``: in memory now,
        in its links file in the runner (which reads the file first: a
        link already there is not written twice).  Only stored content is
        linked (a blob being downloaded is linked when it lands); a link
        used lately costs nothing.
        """
        if digest in self._deleting:
            return
        if digest not in self.index:
            writer = self._writers.get(digest)
            if writer is not None:
                if key not in writer.links:
                    writer.links.append(key)
                return
            if self.index.ready:
                return
            # Perhaps on disk, not yet indexed: the write below happens
            # only if its data is there.
        if self.index.links.has(digest, key):
            return
        self.index.links.add(digest, key)
        if self.on_link is not None:
            self.on_link(digest, key)
        before = self._link_writes.get(digest)
        done: Deferred = Deferred()
        self._link_writes[digest] = done

        def finished(_) -> None:
            if self._link_writes.get(digest) is done:
                del self._link_writes[digest]
            done.callback(None)

        def write(_) -> None:
            # After the digest's earlier writes, so that they land in order
            # and an eviction can wait for them all.  A write that fails
            # loses only a link, confirmed again when next used.
            d = self._run(links.record, self._path("links", digest), self.blob_path(digest), key,
                          self._write_atomic)
            d.addErrback(self._write_failed)
            d.addErrback(lambda failure: self.log.warn("Could not record a link of {digest}: {error}",
                                                       digest=str(digest), error=failure.getErrorMessage()))
            d.addBoth(finished)

        (before if before is not None else succeed(None)).addCallback(write)

    def _links_written(self, digests: List[Digest]) -> Deferred:
        """A Deferred that fires when the link writes under way for ``digests`` are done."""
        waits = []
        for digest in digests:
            last = self._link_writes.get(digest)
            if last is not None:
                w: Deferred = Deferred()
                last.addCallback(lambda result, w=w: (w.callback(None), result)[1])
                waits.append(w)
        return gatherResults(waits) if waits else succeed(None)

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

    def manifest(self, digest: Digest) -> Deferred:
        """
        A Deferred of the cached manifest, or of None.

        Memory holds the manifests used lately, but a copy there is served
        only while its file is still the one it came from, looked at (one
        ``stat`` in the runner) at most every RECHECK seconds: a manifest
        that ``regcache verify`` or a hand removed or replaced is noticed
        within that.  One read from disk (in the runner: at most
        4 MiB) is checked against its digest; one that does not match is
        treated as missing and removed, so it is fetched again.
        """
        if digest in self._deleting:
            return succeed(None)
        held = self._manifests.get(digest)
        if held is not None and (held.identity is None or self._now() - held.checked < RECHECK):
            # The hot path, every cached manifest request but one a second:
            # no coroutine to run for it.
            self._manifests.move_to_end(digest)
            self._used(digest)
            return succeed(held.manifest)
        return Deferred.fromCoroutine(self._manifest(digest, held))

    async def _manifest(self, digest: Digest, held: Optional[_Held]) -> Optional[Manifest]:
        # What the index says now, to tell a stale read from a new copy
        # that landed while the runner read the old one.
        entry = self.index.get(digest)
        landed = self.index.landed
        status, m, identity = await self._run(
            _read_manifest, self._path("manifests", digest), self.blob_path(digest), digest,
            held.identity if held is not None else None,
        )
        if digest in self._deleting:
            return None
        if status == _SAME:
            m = held.manifest
        elif status != _FOUND:
            if self.index.landed == landed:
                if status == _GONE:
                    self.forget(digest)
                    self.index.remove(digest)
                elif status == _CORRUPT:
                    self.log.warn("Cached manifest {digest} does not match its digest: fetching it again",
                                  digest=str(digest))
                    # As a manifest, whatever the index knew it as: the
                    # type record goes too.
                    self._discard(digest, Entry(entry.size if entry else 0, MANIFEST))
            return None
        self._remember(m, identity)
        self._used(digest)
        return m

    def has_manifest(self, digest: Digest) -> bool:
        """
        Whether ``digest`` is held as a manifest, from memory alone, for
        decisions on the reactor (may a stale tag stand in?); loading it
        may still find it gone.  Until the start-up index is loaded, a
        manifest only on disk cannot be ruled out, so it counts as held.
        """
        if digest in self._deleting:
            return False
        if digest in self._manifests:
            return True
        entry = self.index.get(digest)
        if entry is not None:
            return entry.kind == MANIFEST
        return not self.index.ready

    def put_manifest(self, manifest: Manifest, link: Optional[RepoKey] = None) -> Deferred:
        """
        Store a manifest whose bytes were already checked against its digest,
        linked to the repository ``link`` it came from.
        Never fails: a manifest the disk cannot take (ENOSPC, EIO) is logged
        and answered from memory all the same.  Pinned while it is written,
        as a blob is while committed (the bytes may be indexed already).
        """
        self._remember(manifest)
        release = self.pin(manifest.digest)
        d = self._after_delete(manifest.digest)
        d.addCallback(lambda _: self._run(self._write_manifest, manifest))
        d.addCallback(lambda written: self._stored(manifest, link, *written))
        d.addBoth(lambda result: (release(), result)[1])
        d.addErrback(self._write_failed)
        d.addErrback(lambda f: self.log.warn(
            "Could not store manifest {digest}, serving it from memory: {error}",
            digest=str(manifest.digest), error=f.getErrorMessage(),
        ))
        return d

    def _write_failed(self, failure):
        if failure.check(OSError) and failure.value.errno == errno.ENOSPC:
            self.index.on_full()
        return failure

    def _write_manifest(self, m: Manifest) -> Tuple[List[Digest], Identity]:
        """
        The body first, then the type record: a type record whose body is
        missing would hide a manifest the store no longer has.  The body is
        written even if a file of that name is there: it may be the bad copy
        that made this manifest a miss.  Returns what the manifest
        references (parsed here, off the reactor) and the body's identity.
        """
        body = self.blob_path(m.digest)
        self._write_atomic(body, m.body)
        self._write_atomic(self._path("manifests", m.digest), m.media_type.encode("utf-8"))
        return [ref for ref, _ in references(m.body)], _identity(os.stat(body))

    def _stored(self, m: Manifest, link: Optional[RepoKey], refs: List[Digest], identity: Identity) -> None:
        self.index.add(m.digest, m.size, MANIFEST, refs)
        self._remember(m, identity)
        if link is not None:
            self.link(m.digest, link)

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

    def _remember(self, m: Manifest, identity: Optional[Identity] = None) -> None:
        """
        Hold ``m`` in memory as the most recently used, within
        ``memory_limit`` bytes: the least recently used go first.
        ``identity`` is its file's, once it has one.
        """
        held = self._manifests.get(m.digest)
        if held is not None:
            self._manifests.move_to_end(m.digest)
            if identity is not None:
                held.identity, held.checked = identity, self._now()
            return
        if m.size > self.memory_limit:
            return
        while self._manifest_bytes + m.size > self.memory_limit:
            _, old = self._manifests.popitem(last=False)
            self._manifest_bytes -= old.manifest.size
        self._manifests[m.digest] = _Held(m, identity, self._now())
        self._manifest_bytes += m.size

    # Eviction

    def forget(self, digest: Digest) -> None:
        """Drop a manifest from memory: it is about to be evicted."""
        held = self._manifests.pop(digest, None)
        if held is not None:
            self._manifest_bytes -= held.manifest.size

    def delete(self, victims: List[Tuple[Digest, Entry]]) -> Deferred:
        """
        Delete evicted entries' files in a thread, in the given order,
        each one's links first (once the link writes under way are done).
        Until that is done the digests read as missing, and a new copy of
        one waits to be committed, so the deletion cannot remove it.

        Deletions run one after another, each after the one before: an
        eviction pass goes in batches (regcache.expiry), and a layer in a
        later batch than its manifest must not go first, or a crash in
        between leaves a manifest naming a deleted blob.
        """
        digests = [d for d, _ in victims]
        for d in digests:
            self._deleting.setdefault(d, [])
            self.index.links.drop(d)
        size = sum(entry.size for _, entry in victims)
        self.index.deleting += size
        paths = []
        for d, entry in victims:
            paths.append(self._path("links", d))
            if entry.kind == MANIFEST:
                paths.append(self._path("manifests", d))
            paths.append(self.blob_path(d))

        previous, finished = self._deletion, Deferred()
        self._deletion = finished

        def done(result):
            self.index.deleted(size)
            for d in digests:
                for waiter in self._deleting.pop(d, []):
                    waiter.callback(None)
            if self._deletion is finished:
                self._deletion = None
            finished.callback(None)
            return result

        d: Deferred = Deferred()
        if previous is None:
            d.callback(None)
        else:
            previous.addCallback(d.callback)
        d.addCallback(lambda _: self._links_written(digests))
        d.addCallback(lambda _: self._run(_unlink_all, paths))
        return d.addBoth(done)

    def _discard(self, digest: Digest, entry: Entry) -> None:
        """
        A file found bad when opened: out of the index and memory now, off
        the disk in a thread, and meanwhile a miss, so a new copy waits to
        be committed until the bad one is gone.  A file being read or
        written is left alone: a reader holds its own descriptor, a write
        replaces it, and the next open finds it again if neither did.
        """
        if digest in self.index.pins or digest in self._deleting:
            return
        self.index.remove(digest)
        self.forget(digest)
        self.delete([(digest, entry)]).addErrback(
            lambda f: self.log.failure("Removing the bad copy of {digest} failed", f, digest=str(digest)))

    def _after_delete(self, digest: Digest) -> Deferred:
        waiters = self._deleting.get(digest)
        if waiters is None:
            return succeed(None)
        d: Deferred = Deferred()
        waiters.append(d)
        return d

    # Start-up index

    def scan(self) -> Deferred:
        """
        A Deferred of the Scan of everything under ``blobs/``, made in a
        thread from ``scandir`` and ``stat`` and the manifests' own bytes:
        no blob is hashed, and nothing is deleted (requests are being
        served meanwhile; ``regcache verify`` removes what cannot be
        served).
        """
        return self._run(self._scan)

    def walk(self, kind: str = "blobs") -> Iterator[Tuple[Optional[Digest], os.DirEntry]]:
        """
        Every file under ``kind/`` with its digest, or None for a file whose
        name is not a digest regcache could have written.
        """
        base = os.path.join(self.root, kind)
        for alg in _scandir(base):
            for sub in _scandir(alg.path):
                for entry in _scandir(sub.path):
                    if entry.is_file(follow_symlinks=False):
                        yield _digest(alg.name, sub.name, entry.name), entry

    def _scan(self) -> Scan:
        """
        Built for a store of a million entries, in the index's own form
        (regcache.index): per entry one key and one int or tuple outlive the
        scan, and what it needs meanwhile is in arrays, not objects, so that
        the memory it gives back is whole arenas the process can return.
        The links files are not read (regcache.links).
        """
        keys: List[int] = []
        mtimes = array("q")
        sizes = array("q")
        strays = 0
        base = os.path.join(self.root, "blobs")
        for alg in _scandir(base):
            for sub in _scandir(alg.path):
                for entry in _scandir(sub.path):
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if not _is_digest(alg.name, sub.name, entry.name):
                        strays += 1
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    keys.append(int(entry.name, 16))
                    mtimes.append(int(st.st_mtime))
                    sizes.append(st.st_size)
        # Oldest use first, by one int an entry (its mtime, then its place)
        # made before the entries' own: when they go, so do their arenas.
        order = [mtime << 32 | n for n, mtime in enumerate(mtimes)]
        del mtimes
        order.sort()
        entries: Dict[int, object] = {}
        for o in order:
            n = o & 0xFFFFFFFF
            entries[keys[n]] = sizes[n]
        del order, sizes
        # Each digest's one int, for the manifests' references: an int made
        # from a reference's text is another 64 bytes, kept as long as the
        # entry that names it.  One large block, given back when done.
        canon = dict(zip(keys, keys))
        del keys
        referrers: Dict = {}
        for digest, entry in self.walk("manifests"):
            k = canon.get(int(digest.hex, 16)) if digest is not None else None
            if k not in entries:
                # Its body landed after the walk of blobs/ (the live index
                # has it), or it has none and reads as missing.  Deleting
                # here, beside requests, could take a record just written.
                continue
            value = entries[k]
            body = _read_head(self.blob_path(digest), min(value if type(value) is int else value[0],
                                                          MAX_MANIFEST) + 1)
            if body is None:
                continue
            # Bytes that do not match their digest name nothing: an edited
            # manifest must not make good layers look the wrong size.  It
            # is removed when it is first asked for.
            named = []
            if len(body) <= MAX_MANIFEST and hashlib.new(digest.algorithm, body).hexdigest() == digest.hex:
                for ref, size in references(body):
                    r = int(ref.hex, 16)
                    r = canon.setdefault(r, r)
                    named.append(r)
                    # A file of another size than a manifest declares is
                    # treated as missing when opened (Store.open_blob).
                    held = entries.get(r) if size is not None else None
                    if held is not None:
                        entries[r] = size if type(held) is int else (size,) + held[1:]
            named = tuple(dict.fromkeys(named))
            for r in named:
                add_referrer(referrers, r, k)
            value = entries[k]
            entries[k] = (value if type(value) is int else value[0],) + named
        del canon
        stored = sum(v if type(v) is int else v[0] for v in entries.values())
        _give_back()
        return Scan(entries, referrers, stored, strays)


_HEX = {alg: re.compile(f"[0-9a-f]{{{n}}}") for alg, n in ALGORITHMS.items()}


def _is_digest(algorithm: str, prefix: str, name: str) -> bool:
    """Whether a file name in the layout stands for a digest (the hottest path at start-up)."""
    pattern = _HEX.get(algorithm)
    return pattern is not None and len(prefix) == 2 and name.startswith(prefix) and bool(pattern.fullmatch(name))


def _digest(algorithm: str, prefix: str, name: str) -> Optional[Digest]:
    """The digest a file name in the layout stands for."""
    return Digest(algorithm, name) if _is_digest(algorithm, prefix, name) else None


_FOUND, _SAME, _GONE, _CORRUPT, _MISSING = "found", "same", "gone", "corrupt", "missing"


def _read_manifest(record: str, body: str, digest: Digest, known: Optional[Identity]):
    """
    (status, manifest, identity) of a stored manifest, read in a thread:
    _SAME if its body is still the file of identity ``known``, _FOUND with
    the manifest if its bytes match ``digest``, _CORRUPT if they do not,
    _GONE if the body is missing, _MISSING if it is no manifest here (no
    type record, or too big to be one).
    """
    try:
        st = os.stat(body)
    except FileNotFoundError:
        return _GONE, None, None
    if _identity(st) == known:
        return _SAME, None, known
    try:
        with open(record, "r", encoding="utf-8") as f:
            media_type = f.read().strip()
        with open(body, "rb") as f:
            st = os.fstat(f.fileno())
            identity = _identity(st)
            # At the file's size, not MAX_MANIFEST: a read of 4 MiB maps
            # and unmaps that much for every manifest (see _read_head).
            data = f.read(min(st.st_size, MAX_MANIFEST) + 1)
    except FileNotFoundError:
        return _MISSING, None, None
    if len(data) > MAX_MANIFEST:
        return _MISSING, None, None
    if Digest.of(data, digest.algorithm) != digest:
        return _CORRUPT, None, identity
    return _FOUND, Manifest(data, media_type, digest), identity


def _give_back() -> None:
    """
    Return the free memory of the C heap to the system (glibc's
    ``malloc_trim``; elsewhere nothing): the scan's large temporaries
    (the sort, the dicts outgrown as they filled) leave holes there that
    would otherwise stay resident, 20 MiB at a million entries.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _read_head(path: str, most: int) -> Optional[bytes]:
    """
    At most ``most`` bytes of a file (None if it is missing or no file), read with
    ``os.read`` into a buffer of what the file holds: a buffered read of
    MAX_MANIFEST bytes maps and unmaps 4 MiB per file, which made reading
    a third of a million small manifests at start-up take minutes.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        parts = []
        while most > 0:
            part = os.read(fd, most)
            if not part:
                break
            parts.append(part)
            most -= len(part)
        return b"".join(parts)
    except IsADirectoryError:
        # Put there by hand since the walk: no manifest to read.
        return None
    finally:
        os.close(fd)


def _scandir(path: str) -> List[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _unlink_all(paths: List[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _touch(paths: List[str], when: float) -> None:
    for path in paths:
        try:
            os.utime(path, (when, when))
        except FileNotFoundError:
            pass


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
