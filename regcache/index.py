# test-case-name: tests.test_expiry,tests.test_store
"""
What the store holds, in memory: every file under ``blobs/`` in
least-recently-used order, which manifest needs which blobs, the pins of
readers and the bytes downloads are writing.  regcache.expiry reads it to
choose what to evict; regcache.store tells it what happened on disk.

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
  parsed when stored and when indexed (they are at most 4 MiB);
- which repositories hold each digest comes from its links file
  (regcache.links), and from the manifests of those repositories that name
  it.

The bytes it counts are bytes on disk, downloads under way included.  A
download counts its announced size a step (``RESERVE_AHEAD``) ahead of the
bytes it wrote: room is made before its bytes arrive, yet an upstream whose
length lies cannot evict more than one step beyond what it really sent.  A
download pauses (``room``) while evicted files are still being deleted if
writing on would pass the limit.
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred

from regcache.links import Links, RepoKey
from regcache.reference import Digest

BLOB = "blob"
MANIFEST = "manifest"

#: How stale a persisted access time may get, in seconds.
TOUCH_EVERY = 600.0

#: The most a download writes between two room checks (one read from the
#: upstream socket, up to upstream_http.UPSTREAM_READ_SIZE: 1 MiB), with
#: room to spare.  tests/test_body.py checks the two agree.
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
    #: Digest -> the repositories its links file names, oldest first.
    links: Dict[Digest, List[RepoKey]] = field(default_factory=dict)


def _noop() -> None:
    pass


class Index:
    """
    Every complete file under ``blobs/``, in LRU order, with the manifest
    reference graph, the pins of readers, and the bytes still being written.

    Pure bookkeeping on the reactor thread; the Store does the I/O and tells
    the index what happened.  ``on_grow`` and ``on_full`` are set by the
    Expiry that watches it (regcache.expiry).
    """

    def __init__(self, now: Callable[[], float]):
        self._now = now
        self.entries: "OrderedDict[Digest, Entry]" = OrderedDict()
        self.refs: Dict[Digest, Tuple[Digest, ...]] = {}
        self.referrers: Dict[Digest, Set[Digest]] = {}
        #: Which repositories hold each entry (until the start-up scan is
        #: loaded, also entries it has not found yet).
        self.links = Links()
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
        """Bytes on disk: complete entries and downloads under way (tag files have a bound of their own)."""
        return self.stored + self.writing

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
        self.links.drop(digest)
        for ref in self.refs.pop(digest, ()):
            users = self.referrers.get(ref)
            if users is not None:
                users.discard(digest)
                if not users:
                    del self.referrers[ref]
        return entry

    def named_by(self, digest: Digest, key: RepoKey) -> bool:
        """
        Whether a manifest linked to ``key`` names ``digest``, directly or
        through an index (an index's children are that repository's too):
        a layer of an image pulled from a repository is that repository's.
        Subjects are no such name: a signature does not make its image
        another repository's.
        """
        todo, seen = list(self.referrers.get(digest, ())), {digest}
        while todo:
            d = todo.pop()
            if d in seen:
                continue
            seen.add(d)
            if self.links.has(d, key):
                return True
            todo.extend(self.referrers.get(d, ()))
        return False

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
        for digest, keys in scan.links.items():
            if digest in entries:
                self.links.merge(digest, keys)
        self.links.only(entries)
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
