# test-case-name: tests.test_expiry,tests.test_store,tests.test_index
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
- last use is the entries' order in memory, and persisted as the file's
  mtime, at most once per ``TOUCH_EVERY`` window per entry (twice across a
  window's edge), so a busy blob costs one ``utime`` per ten minutes rather
  than one per request, and after a restart the LRU order is right to within
  those ten minutes, which is all eviction needs;
- which manifest needs which blobs comes from the manifests themselves,
  parsed when stored and when indexed (they are at most 4 MiB);
- which repositories hold each digest is not here: it is in the links files
  (regcache.links), read when asked (regcache.store).

A store may hold a million entries, so an entry is no object of its own:
the key is the digest as one int (64 bytes for sha256, where its raw bytes
take 80; the bit length tells the algorithm, since a longer digest would
need 128 leading zero bits to pass for a sha256), the value one int (a
blob's size) or, for a manifest, one tuple of its size and the keys it
names, and the LRU order is the plain dict's insertion order (a use pops
and re-inserts).  A blob named by one manifest
records that manifest's key, not a set of one.  ``Entry`` and ``Digest``
objects are made only for what a caller asks about.  That is about 160
bytes an entry (bench/README.md has the figures).

The bytes it counts are bytes on disk, downloads under way included.  A
download counts its announced size a step (``RESERVE_AHEAD``) ahead of the
bytes it wrote: room is made before its bytes arrive, yet an upstream whose
length lies cannot evict more than one step beyond what it really sent.  A
download pauses (``room``) while evicted files are still being deleted if
writing on would pass the limit.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

from twisted.internet.defer import Deferred

from regcache.links import Links
from regcache.reference import ALGORITHMS, Digest

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

#: The most manifests ``naming`` returns: what a cross-repository check
#: reads (their links files) before it asks upstream instead.
MAX_NAMING = 64

#: Removals remembered until the start-up scan is loaded.  Requests for
#: digests never stored are removals too, so they are bounded; one the
#: scan then brings back whose file is gone leaves again at its next open.
MAX_GONE = 65536

#: A digest as an int: the index's key.
Key = int
#: A blob's size, or a manifest's (size, key it names, ...).
Value = Union[int, Tuple]
#: The manifest that names a key, or a set when several do.
Referrers = Union[Key, Set[Key]]

#: Shortest first: (most bits, algorithm, hex digits).
_BY_BITS = sorted((n * 4, alg, n) for alg, n in ALGORITHMS.items())


def key(digest: Digest) -> Key:
    return int(digest.hex, 16)


def digest_of(k: Key) -> Digest:
    bits = k.bit_length()
    for most, alg, n in _BY_BITS:
        if bits <= most:
            return Digest(alg, format(k, f"0{n}x"))
    raise ValueError("no digest algorithm has that many bits")


class Entry(NamedTuple):
    """One entry as callers see it, made when asked for."""

    size: int
    kind: str


def _entry(value: Value) -> Entry:
    if type(value) is tuple:
        return Entry(value[0], MANIFEST)
    return Entry(value, BLOB)


def _size(value: Value) -> int:
    return value[0] if type(value) is tuple else value


def _named(value: Value) -> Tuple:
    return value[1:] if type(value) is tuple else ()


@dataclass
class Scan:
    """
    What a start-up scan of the store found, built in a thread in the
    index's own form, so that adopting it costs the reactor nothing per
    entry.
    """

    #: Key -> value (see ``Index``), oldest use first.
    entries: Dict[Key, Value] = field(default_factory=dict)
    #: The manifests' references the other way round.
    referrers: Dict[Key, Referrers] = field(default_factory=dict)
    #: The sum of the entries' sizes.
    stored: int = 0
    strays: int = 0


def add_referrer(referrers: Dict[Key, Referrers], ref: Key, manifest: Key) -> None:
    users = referrers.get(ref)
    if users is None:
        referrers[ref] = manifest
    elif type(users) is set:
        users.add(manifest)
    elif users != manifest:
        referrers[ref] = {users, manifest}


def _drop_referrer(referrers: Dict[Key, Referrers], ref: Key, manifest: Key) -> None:
    users = referrers.get(ref)
    if users == manifest:
        del referrers[ref]
    elif type(users) is set:
        users.discard(manifest)
        if len(users) == 1:
            referrers[ref] = users.pop()


def _users(referrers: Dict[Key, Referrers], k: Key) -> Iterable[Key]:
    users = referrers.get(k)
    if users is None:
        return ()
    return users if type(users) is set else (users,)


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
        #: Least recently used first (see the module's docstring).
        self._entries: Dict[Key, Value] = {}
        self._referrers: Dict[Key, Referrers] = {}
        #: Keys whose use was persisted in the current TOUCH_EVERY window:
        #: as many as were used in ten minutes, not one per entry.
        self._touched: Set[Key] = set()
        self._window = None
        #: Until the start-up scan is loaded: what was removed meanwhile,
        #: which the scan may still have found.
        self._gone: Set[Key] = set()
        #: Bumped by every ``add``: a caller that read the disk can tell
        #: whether a new copy may have landed meanwhile.
        self.landed = 0
        #: The links used lately (what is not here is in the links files).
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
        return len(self._entries)

    def __contains__(self, digest: Digest) -> bool:
        return key(digest) in self._entries

    def get(self, digest: Digest) -> Optional[Entry]:
        value = self._entries.get(key(digest))
        return None if value is None else _entry(value)

    def digests(self) -> Iterator[Digest]:
        """Every entry's digest, least recently used first."""
        return (digest_of(k) for k in self._entries)

    def referrers(self, digest: Digest) -> Set[Digest]:
        """The manifests that name ``digest`` directly."""
        return {digest_of(k) for k in _users(self._referrers, key(digest))}

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
        A file landed under ``blobs/``: the most recently used entry.  A
        manifest whose bytes were already there as a blob becomes a
        manifest.
        """
        k = key(digest)
        old = self._entries.get(k)
        if old is not None:
            self._pop(k)
            if type(old) is tuple:
                kind = MANIFEST
        if kind == MANIFEST:
            named = tuple(dict.fromkeys(key(r) for r in refs))
            self._entries[k] = (size,) + named
            for ref in named:
                add_referrer(self._referrers, ref, k)
        else:
            self._entries[k] = size
        # Its file's mtime is now: this window's use is persisted.
        self._in_window().add(k)
        self._gone.discard(k)
        self.stored += size
        self.landed += 1
        self.on_grow()

    def use(self, digest: Digest) -> List[Digest]:
        """
        Mark a use of ``digest`` and, for a manifest, of everything it
        names (through an index too): clients skip the layers they already
        have, so a hot manifest's base layer may never be fetched, yet it
        is as needed as the manifest.  Returns the entries whose use should
        be persisted now (their files touched).
        """
        touched = self._in_window()
        entries = self._entries
        touch: List[Digest] = []
        todo, seen = [key(digest)], set()
        while todo:
            k = todo.pop()
            if k in seen:
                continue
            value = entries.pop(k, None)
            if value is None:
                continue
            seen.add(k)
            entries[k] = value
            todo.extend(_named(value))
            if k not in touched:
                touched.add(k)
                touch.append(digest_of(k))
        return touch

    def _in_window(self) -> Set[Key]:
        """The keys whose use is persisted in the current TOUCH_EVERY window."""
        window = int(self._now() // TOUCH_EVERY)
        if window != self._window:
            self._window, self._touched = window, set()
        return self._touched

    def remove(self, digest: Digest) -> Optional[Entry]:
        k = key(digest)
        if not self.ready and len(self._gone) < MAX_GONE:
            self._gone.add(k)
        value = self._pop(k)
        if value is None:
            return None
        self.links.drop(digest)
        return _entry(value)

    def _pop(self, k: Key) -> Optional[Value]:
        value = self._entries.pop(k, None)
        if value is None:
            return None
        self.stored -= _size(value)
        self._touched.discard(k)
        for ref in _named(value):
            _drop_referrer(self._referrers, ref, k)
        return value

    def naming(self, digest: Digest) -> List[Digest]:
        """
        The manifests that name ``digest``, directly or through an index
        (an index's children are that repository's too), nearest first, at
        most MAX_NAMING: whose links make a layer of an image pulled from a
        repository that repository's.  Subjects are no such name: a
        signature does not make its image another repository's.
        """
        found: List[Digest] = []
        start = key(digest)
        todo, seen = deque(_users(self._referrers, start)), {start}
        while todo and len(found) < MAX_NAMING:
            k = todo.popleft()
            if k in seen:
                continue
            seen.add(k)
            if k in self._entries:
                found.append(digest_of(k))
            todo.extend(_users(self._referrers, k))
        return found

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

    # Start-up

    def load(self, scan: Scan) -> None:
        """
        Adopt a start-up scan.  Whatever the reactor learned while the scan
        ran is newer than the scan: what it removed stays removed (the scan
        may have seen the file before it went), and what it added or used
        wins and goes last in LRU order.  The scan's tables become the
        index's own, so this costs the reactor what was learned meanwhile,
        not what the scan found.
        """
        entries, referrers, stored = scan.entries, scan.referrers, scan.stored
        live = self._entries
        for k in self._gone | live.keys():
            value = entries.pop(k, None)
            if value is not None:
                stored -= _size(value)
                for ref in _named(value):
                    _drop_referrer(referrers, ref, k)
        for k, value in live.items():
            entries[k] = value
            stored += _size(value)
            for ref in _named(value):
                add_referrer(referrers, ref, k)
        self._entries, self._referrers, self.stored = entries, referrers, stored
        self._gone = set()
        self.ready = True

    # Eviction

    def choose(self, target: int, most: Optional[int] = None) -> List[Tuple[Digest, Entry]]:
        """
        Remove and return the least recently used entries, enough to bring
        ``total`` down to ``target`` (or ``most`` of them, give or take
        the manifests of the last), in the order their files must be
        deleted: every manifest before what it references.  A pinned entry
        is never chosen, nor one a pinned manifest references.
        """
        pinned = {key(d) for d in self.pins}
        chosen: List[Key] = []
        taken: Set[Key] = set()
        total = self.total
        entries = self._entries
        for k in entries:
            if total <= target or (most is not None and len(chosen) >= most):
                break
            if k in taken or k in pinned:
                continue
            group = self._with_referrers(k, taken, pinned)
            if group is None:
                continue
            for g in group:
                taken.add(g)
                total -= _size(entries[g])
                chosen.append(g)
        victims = []
        for k in chosen:
            victims.append((digest_of(k), _entry(self._pop(k))))
        return victims

    def _with_referrers(self, k: Key, taken: Set[Key], pinned: Set[Key]) -> Optional[List[Key]]:
        """
        ``k`` and every cached manifest that needs it, directly or
        through an index, referrers first; None if any of them is pinned.
        """
        order: List[Key] = []
        seen: Set[Key] = set()

        def visit(d: Key) -> bool:
            if d in seen or d in taken:
                return True
            seen.add(d)
            if d in pinned:
                return False
            for user in _users(self._referrers, d):
                if user in self._entries and not visit(user):
                    return False
            order.append(d)
            return True

        return order if visit(k) else None
