# test-case-name: tests.test_expiry
"""
Keeping the store inside its size limit: a background evictor that watches
the index (regcache.index) and, past the high-water mark, deletes the least
recently used entries down to the low-water mark.

Eviction never removes a blob while keeping a manifest that names it: the
manifest goes with it, and its files are deleted first, so even an eviction
that a ``kill -9`` cut short leaves no manifest whose blob it took.  A
manifest that is used counts as a use of what it names.  Tag entries are
left alone: one that names an evicted manifest is a miss like any other, and
the mirror fetches the manifest again by digest.

The limit bounds bytes on disk, downloads under way included (the index
counts them).  A blob announced larger than the limit is refused before
anything is evicted.  Only what cannot be evicted (blobs being read or
written) can hold the store above it, and that is logged.
"""

import gc
import math
from typing import List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from regcache.index import MANIFEST, Index, Scan


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

    Eviction is triggered by growth (each write and commit), by ENOSPC, by
    the end of the backoff after one that could free nothing, and by a
    periodic check that also retries a failed start-up scan.  Every
    run catches and logs its own errors: a LoopingCall stops for good on its
    first exception.
    """

    log = Logger()

    HIGH = 0.95
    LOW = 0.85
    CHECK_EVERY = 60.0
    #: After an eviction that could free nothing (all pinned or being
    #: written), growth does not retry it for this long; then it is retried
    #: anyway, since the pins may be gone with nothing left to grow.
    BACKOFF = 5.0
    #: Entries chosen per reactor turn.  Choosing runs on the reactor (so
    #: nothing starts reading a victim meanwhile) at microseconds an
    #: entry; a pass over a store of a million entries evicts a hundred
    #: thousand or more, so it goes in turns of about this many, each one
    #: deleted as soon as it is chosen, and requests are served between.
    BATCH = 1024
    #: Batches being deleted at once.  The next is chosen when one is done:
    #: deleting is what takes long (three files an entry), and a pass
    #: chosen all at once would hold a hundred thousand victims' digests
    #: and paths in memory while the threads work through them.
    IN_FLIGHT = 2

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
        self._retry = None
        self._next_batch = None
        #: Whether the last batch chosen left the pass short of its target.
        self._more = False
        self._loop = LoopingCall(self._periodic)
        self._loop.clock = clock
        if metrics is not None:
            metrics.store_bytes.set_function(lambda: self.index.stored)
            metrics.store_entries.set_function(lambda: len(self.index))
            metrics.store_indexed.set_function(lambda: 1 if self.index.ready else 0)
            metrics.store_limit.set_function(lambda: math.inf if self.limit is None else self.limit)

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
        for call in (self._retry, self._next_batch):
            if call is not None and call.active():
                call.cancel()
        if self.evicting:
            return DeferredList(list(self.evicting))
        return None

    def _load(self) -> None:
        started = self.clock.seconds()
        self._loading = self.store.scan()

        def loaded(scan: Scan) -> None:
            self.index.load(scan)
            # What was just loaded lives as long as the process and holds
            # no cycles: out of the collector's reach, a full collection
            # does not walk a million objects with the GIL held.
            gc.freeze()
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
        if len(self.evicting) >= self.IN_FLIGHT:
            # A pass under way: it goes on as its batches are deleted.
            return
        try:
            limit = self.limit
            if limit is None:
                return
            before = self.index.total
            target = int(limit * self.LOW)
            chose = self.clock.seconds()
            victims = self.index.choose(target, most=self.BATCH)
            chose = self.clock.seconds() - chose
            if not victims:
                self._stuck_until = self.clock.seconds() + self.BACKOFF
                if self._retry is None or not self._retry.active():
                    self._retry = self.clock.callLater(self.BACKOFF, self.check)
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
        self._more = len(victims) >= self.BATCH and self.index.total > target
        self.evicting.append(deleting)
        deleting.addBoth(self._evicted, deleting, victims, before, started, chose)
        self._go_on()

    def _go_on(self) -> None:
        """Choose the next batch of a pass in a later reactor turn, while fewer than IN_FLIGHT are being deleted."""
        if self._more and len(self.evicting) < self.IN_FLIGHT and self._next_batch is None:
            self._next_batch = self.clock.callLater(0, self._batch)

    def _batch(self) -> None:
        """The next turn of a pass that chose a whole batch and is not down to the low-water mark yet."""
        self._next_batch = None
        limit = self.limit
        if limit is None or self.index.total <= int(limit * self.LOW):
            self._more = False
            return
        # With IN_FLIGHT batches being deleted (a check chose one meanwhile)
        # this chooses nothing and the pass stays owed: the next batch done
        # brings it back here.
        self.evict()

    def _evicted(self, result, deleting, victims, before: int, started: float, chose: float) -> None:
        self.evicting.remove(deleting)
        self._go_on()
        # Growth that came while IN_FLIGHT batches were being deleted did
        # not evict: this is its turn.
        self.check()
        freed = sum(entry.size for _, entry in victims)
        if isinstance(result, Failure):
            self.log.failure("Deleting evicted files failed", result)
            return
        manifests = sum(1 for _, e in victims if e.kind == MANIFEST)
        self.log.info(
            "Evicted {count} entries ({manifests} manifests), {freed} bytes, in {took:.3f}s "
            "(chosen in {chose:.3f}s on the reactor): store {before} -> {after} bytes (limit {limit})",
            count=len(victims), manifests=manifests, freed=freed, took=self.clock.seconds() - started, chose=chose,
            before=before, after=self.index.total, limit=self.limit, event="evict",
        )
        if self.metrics is not None:
            for _, entry in victims:
                self.metrics.evicted.labels(entry.kind).inc()
