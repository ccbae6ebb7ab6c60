# test-case-name: tests.test_expiry
"""
Keeping the store inside its size limit: an in-memory index of everything
under ``blobs/`` in least-recently-used order, and a background evictor.

The index holds no fact the files cannot give back.  It is rebuilt at every
start from ``scandir`` and ``stat`` (no rehash, in a thread), so after a crash
or a hand edit the files win by construction and there is no database to go
out of step with them:

- sizes are the files' sizes (or, for a layer that a cached manifest
  describes, the size the manifest declares: a file of another size is
  treated as missing and fetched again);
- last use is kept in memory and persisted as the file's mtime, at most once
  every ``TOUCH_EVERY`` seconds per entry, so a busy blob costs one ``utime``
  per ten minutes rather than one per request, and after a restart the LRU
  order is right to within those ten minutes, which is all eviction needs;
- which manifest needs which blobs comes from the manifests themselves,
  parsed when stored and when indexed (they are at most 4 MiB).

Eviction never removes a blob while keeping a manifest that names it: the
manifest goes with it, and its files are deleted first, so even an eviction
that a ``kill -9`` cut short leaves no manifest whose blob it took.  A
manifest that is used counts as a use of what it names.  Tag entries are
left alone: one that names an evicted manifest is a miss like any other, and
the mirror fetches the manifest again by digest.

The limit bounds bytes on disk, downloads under way included.  A blob
announced larger than the limit is refused before anything is evicted.
Otherwise a download counts its announced size a step (``RESERVE_AHEAD``)
ahead of the bytes it wrote: room is made before its bytes arrive, yet an
upstream whose length lies cannot evict more than one step beyond what it
really sent.  A download pauses while evicted files are still being
deleted if writing on would pass the limit.  Only what cannot be evicted
(blobs being read or written) can hold the store above it, and that is
logged.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from regcache.reference import Digest

BLOB = "blob"
MANIFEST = "manifest"

#: How stale a persisted access time may get, in seconds.
TOUCH_EVERY = 600.0

#: The most a download writes between two room checks (one read from the
#: upstream socket, up to service.UPSTREAM_READ_SIZE: 1 MiB), with room to
#: spare.  tests/test_body.py checks the two agree.
CHUNK_HEADROOM = 2 * 1024 * 1024

#: How far ahead of its written bytes a download counts its announced size.
RESERVE_AHEAD = 16 * 1024 * 1024


@dataclass
class Entry:
    size: int
    kind: str
    #: Clock seconds of the last use, in memory.
    used: float
    #: The last use that was written to the file's mtime.
    persisted: float


@dataclass
class Scan:
    """
    What a start-up scan of the store found, built in a thread.
    """

    #: Oldest use first.
    entries: "OrderedDict[Digest, Entry]"
    #: Manifest digest -> the (digest, declared size) pairs it references.
    refs: Dict[Digest, Tuple[Tuple[Digest, int], ...]]
    strays: int = 0


def _noop() -> None:
    pass


class Index:
    """
    Every complete file under ``blobs/``, in LRU order, with the manifest
    reference graph, the pins of readers, and the bytes still being written.

    Pure bookkeeping on the reactor thread; the Store does the I/O and tells
    the index what happened.  ``on_grow`` and ``on_full`` are set by the
    Expiry that watches it.
    """

    def __init__(self, now: Callable[[], float]):
        self._now = now
        self.entries: "OrderedDict[Digest, Entry]" = OrderedDict()
        self.refs: Dict[Digest, Tuple[Digest, ...]] = {}
        self.referrers: Dict[Digest, Set[Digest]] = {}
        self.pins: Dict[Digest, int] = {}
        self.stored = 0
        #: Bytes downloads under way count: each what it wrote plus up to
        #: ``ahead`` more of what it announced.  Room is made before the
        #: bytes arrive, but never for more than a step of bytes that did
        #: not (a false Content-Length would otherwise evict everything).
        self.writing = 0
        #: Bytes those downloads have actually written so far.
        self.written = 0
        #: Bytes of evicted files whose deletion is still under way.
        self.deleting = 0
        #: Bytes of tag entries under ``tags/``, which regcache.tags reports:
        #: never evicted, but on the same disk, so they count.
        self.tags = 0
        #: The limit in force (set by Expiry), for ``room``.
        self.limit: Optional[int] = None
        #: How far below the limit ``room`` starts pausing downloads.
        self.headroom = CHUNK_HEADROOM
        #: How far past its written bytes a download counts its length.
        self.ahead = RESERVE_AHEAD
        self._room_waiters: List[Deferred] = []
        self.ready = False
        self.on_grow: Callable[[], None] = _noop
        self.on_full: Callable[[], None] = _noop

    @property
    def total(self) -> int:
        """Bytes on disk: complete entries, downloads under way, tag entries."""
        return self.stored + self.writing + self.tags

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, digest: Digest) -> bool:
        return digest in self.entries

    def get(self, digest: Digest) -> Optional[Entry]:
        return self.entries.get(digest)

    # What the store reports

    def grow(self, counted: int, written: int = 0) -> None:
        """
        Downloads under way will take ``counted`` bytes more (fewer, when
        negative), of which ``written`` are on disk now.
        """
        self.writing += counted
        self.written += written
        if counted > 0:
            self.on_grow()

    def room(self) -> Optional[Deferred]:
        """
        None if a download may write on; else a Deferred that fires when
        the deletions under way are done.  Evicted files leave the index
        when chosen but the disk only when a thread has deleted them, so a
        fast download could otherwise overtake them past the limit.
        """
        if not self.deleting or self.limit is None:
            return None
        # Pause one chunk early: the bytes that arrive next are already on
        # their way and will be written before this check runs again.
        if self.stored + self.deleting + self.written + self.headroom <= self.limit:
            return None
        d: Deferred = Deferred()
        self._room_waiters.append(d)
        return d

    def deleted(self, n: int) -> None:
        """``n`` bytes of evicted files are gone from the disk."""
        self.deleting -= n
        waiters, self._room_waiters = self._room_waiters, []
        for d in waiters:
            d.callback(None)

    def add(self, digest: Digest, size: int, kind: str = BLOB, refs: Iterable[Digest] = ()) -> None:
        """
        A file landed under ``blobs/``.  A manifest whose bytes were already
        there as a blob becomes a manifest.
        """
        now = self._now()
        old = self.entries.pop(digest, None)
        if old is not None:
            self.stored -= old.size
            kind = MANIFEST if MANIFEST in (kind, old.kind) else BLOB
        self.entries[digest] = Entry(size, kind, now, now)
        self.stored += size
        if kind == MANIFEST and refs:
            self._link(digest, tuple(refs))
        self.on_grow()

    def use(self, digest: Digest) -> List[Digest]:
        """
        Mark a use of ``digest`` and, for a manifest, of everything it
        names (through an index too): clients skip the layers they already
        have, so a hot manifest's base layer may never be fetched, yet it
        is as needed as the manifest.  Returns the entries whose use should
        be persisted now (their files touched).
        """
        now = self._now()
        touch: List[Digest] = []
        todo, seen = [digest], set()
        while todo:
            d = todo.pop()
            entry = self.entries.get(d)
            if entry is None or d in seen:
                continue
            seen.add(d)
            todo.extend(self.refs.get(d, ()))
            self.entries.move_to_end(d)
            entry.used = now
            if now - entry.persisted >= TOUCH_EVERY:
                entry.persisted = now
                touch.append(d)
        return touch

    def remove(self, digest: Digest) -> Optional[Entry]:
        entry = self.entries.pop(digest, None)
        if entry is None:
            return None
        self.stored -= entry.size
        for ref in self.refs.pop(digest, ()):
            users = self.referrers.get(ref)
            if users is not None:
                users.discard(digest)
                if not users:
                    del self.referrers[ref]
        return entry

    def pin(self, digest: Digest) -> Callable[[], None]:
        """
        Keep ``digest`` from eviction until the returned release is called
        (once; later calls do nothing).
        """
        self.pins[digest] = self.pins.get(digest, 0) + 1
        released = []

        def release() -> None:
            if released:
                return
            released.append(True)
            left = self.pins[digest] - 1
            if left:
                self.pins[digest] = left
            else:
                del self.pins[digest]

        return release

    def _link(self, manifest: Digest, refs: Tuple[Digest, ...]) -> None:
        self.refs[manifest] = refs
        for ref in refs:
            self.referrers.setdefault(ref, set()).add(manifest)

    # Start-up

    def load(self, scan: Scan) -> None:
        """
        Merge a start-up scan.  Whatever the reactor learned while the scan
        ran (commits, uses) is newer than the scan, so it wins and goes last
        in LRU order.
        """
        live = self.entries
        entries = scan.entries
        for digest in live:
            entries.pop(digest, None)
        for digest, entry in live.items():
            entries[digest] = entry
        self.entries = entries
        live_refs = self.refs
        self.refs, self.referrers = {}, {}
        for manifest, refs in scan.refs.items():
            if manifest in entries and manifest not in live_refs:
                self._link(manifest, tuple(d for d, _ in refs))
        for manifest, refs in live_refs.items():
            self._link(manifest, refs)
        self.stored = sum(e.size for e in entries.values())
        self.ready = True

    # Eviction

    def choose(self, target: int) -> List[Tuple[Digest, Entry]]:
        """
        Remove and return the least recently used entries, enough to bring
        ``total`` down to ``target``, in the order their files must be
        deleted: every manifest before what it references.  A pinned entry
        is never chosen, nor one a pinned manifest references.
        """
        chosen: List[Tuple[Digest, Entry]] = []
        taken: Set[Digest] = set()
        total = self.total
        for digest in self.entries:
            if total <= target:
                break
            if digest in taken or digest in self.pins:
                continue
            group = self._with_referrers(digest, taken)
            if group is None:
                continue
            for d in group:
                taken.add(d)
                total -= self.entries[d].size
                chosen.append((d, self.entries[d]))
        for d, _ in chosen:
            self.remove(d)
        return chosen

    def _with_referrers(self, digest: Digest, taken: Set[Digest]) -> Optional[List[Digest]]:
        """
        ``digest`` and every cached manifest that needs it, directly or
        through an index, referrers first; None if any of them is pinned.
        """
        order: List[Digest] = []
        seen: Set[Digest] = set()

        def visit(d: Digest) -> bool:
            if d in seen or d in taken:
                return True
            seen.add(d)
            if d in self.pins:
                return False
            for user in self.referrers.get(d, ()):
                if user in self.entries and not visit(user):
                    return False
            order.append(d)
            return True

        return order if visit(digest) else None


class Expiry(Service):
    """
    Keeps the store under ``max_size``: past the high-water mark it evicts
    the least recently used entries, in the background, down to the
    low-water mark.

    A full disk teaches it a lower limit: what the store held when a write
    failed with ENOSPC.  The cache then gives way to whatever else fills the
    disk, instead of failing every download from then on.  The periodic
    check asks the filesystem for its free space while such a limit is in
    force, and raises it to what the disk can take again (dropping it once
    that reaches ``max_size``): space that comes back is used again.

    Eviction is triggered by growth (each write and commit), by ENOSPC, and
    by a periodic check that also retries a failed start-up scan.  Every
    run catches and logs its own errors: a LoopingCall stops for good on its
    first exception.
    """

    log = Logger()

    HIGH = 0.95
    LOW = 0.85
    CHECK_EVERY = 60.0
    #: After an eviction that could free nothing (all pinned or being
    #: written), growth does not retry it for this long.
    BACKOFF = 5.0

    def __init__(self, store, max_size: Optional[int], clock, metrics=None):
        self.store = store
        self.index: Index = store.index
        self.max_size = max_size
        self.learned: Optional[int] = None
        self.clock = clock
        self.metrics = metrics
        self.index.on_grow = self.check
        self.index.on_full = self.full
        self.index.limit = self.limit
        #: Deletions under way.  Batches may overlap: each one's victims left
        #: the index when they were chosen.
        self.evicting: List[Deferred] = []
        self._loading: Optional[Deferred] = None
        self._stuck_until = 0.0
        self._loop = LoopingCall(self._periodic)
        self._loop.clock = clock
        if metrics is not None:
            metrics.store_bytes.set_function(lambda: self.index.stored)
            metrics.store_entries.set_function(lambda: len(self.index))

    @property
    def limit(self) -> Optional[int]:
        limits = [n for n in (self.max_size, self.learned) if n is not None]
        return min(limits) if limits else None

    # Service

    def startService(self) -> None:
        super().startService()
        self._load()
        self._loop.start(self.CHECK_EVERY, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self.evicting:
            return DeferredList(list(self.evicting))
        return None

    def _load(self) -> None:
        started = self.clock.seconds()
        self._loading = self.store.scan()

        def loaded(scan: Scan) -> None:
            self.index.load(scan)
            self.log.info(
                "Indexed {count} cached files, {size} bytes, in {took:.3f}s{strays}",
                count=len(self.index), size=self.index.stored, took=self.clock.seconds() - started,
                strays=f" ({scan.strays} stray files ignored)" if scan.strays else "",
                event="index",
            )
            self.check()

        def failed(f) -> None:
            self.log.failure("Indexing the store failed; eviction waits for the next try", f)

        def done(_) -> None:
            self._loading = None

        self._loading.addCallback(loaded)
        self._loading.addErrback(failed)
        self._loading.addBoth(done)

    def _periodic(self) -> None:
        try:
            if not self.index.ready:
                if self._loading is None:
                    self._load()
                return
            self._stuck_until = 0.0
            if self.learned is not None:
                d = self.store.free_space()
                d.addCallback(self._space)
                d.addErrback(lambda f: self.log.failure("Checking the disk's free space failed", f))
            self.check()
        except Exception:
            self.log.failure("Periodic store check failed")

    def _space(self, free: int) -> None:
        """
        The disk has ``free`` bytes besides what the cache holds: raise the
        learned limit to what it can take now.  Never lowered here (only a
        write that fails teaches a lower one).
        """
        if self.learned is None:
            return
        room = self.index.stored + self.index.written + free
        if self.max_size is not None and room >= self.max_size:
            self._learn(None)
        elif room > self.learned:
            self._learn(room)
        else:
            return
        self.log.info("The cache's disk has room again: limit now {limit} bytes",
                      limit=self.limit, event="disk-room")

    def _learn(self, limit: Optional[int]) -> None:
        self.learned = limit
        self.index.limit = self.limit

    # Triggers

    def check(self) -> None:
        """
        Start an eviction if the store is past the high-water mark.  Cheap:
        it runs on every write.
        """
        limit = self.limit
        if limit is None or not self.index.ready:
            return
        if self.index.total > limit * self.HIGH and self.clock.seconds() >= self._stuck_until:
            self.evict()

    def full(self) -> None:
        """
        A write failed for lack of space: what the store holds now is what
        the disk can take.
        """
        held = self.index.stored + self.index.written
        if self.learned is None or held < self.learned:
            self._learn(max(held, 1))
            self.log.warn(
                "Disk full with {held} bytes cached: limiting the cache to that until the disk has room",
                held=held, event="disk-full",
            )
        self._stuck_until = 0.0
        self.check()

    def evict(self) -> None:
        """
        Choose victims now (on the reactor, so nothing can start reading
        them in between), then delete their files in a thread.
        """
        try:
            limit = self.limit
            if limit is None:
                return
            before = self.index.total
            victims = self.index.choose(int(limit * self.LOW))
            if not victims:
                self._stuck_until = self.clock.seconds() + self.BACKOFF
                self.log.warn(
                    "Store holds {total} bytes, past {high:.0%} of its {limit} byte limit, and nothing "
                    "more can be evicted: {pinned} entries in use, {writing} bytes being written",
                    total=before, high=self.HIGH, limit=limit, pinned=len(self.index.pins),
                    writing=self.index.writing,
                )
                return
            for digest, _ in victims:
                self.store.forget(digest)
            started = self.clock.seconds()
            deleting = self.store.delete(victims)
        except Exception:
            self.log.failure("Choosing what to evict failed")
            return
        self.evicting.append(deleting)
        deleting.addBoth(self._evicted, deleting, victims, before, started)

    def _evicted(self, result, deleting, victims, before: int, started: float) -> None:
        self.evicting.remove(deleting)
        freed = sum(entry.size for _, entry in victims)
        if isinstance(result, Failure):
            self.log.failure("Deleting evicted files failed", result)
            return
        manifests = sum(1 for _, e in victims if e.kind == MANIFEST)
        self.log.info(
            "Evicted {count} entries ({manifests} manifests), {freed} bytes, in {took:.3f}s: "
            "store {before} -> {after} bytes (limit {limit})",
            count=len(victims), manifests=manifests, freed=freed, took=self.clock.seconds() - started,
            before=before, after=self.index.total, limit=self.limit, event="evict",
        )
        if self.metrics is not None:
            for _, entry in victims:
                self.metrics.evicted.labels(entry.kind).inc()
