# test-case-name: tests.test_sweeper,tests.integration.test_sweeper_proc
"""
The bucket's size limit (``--s3-max-size``): one replica at a time sweeps
the bucket and evicts the least recently used blobs past the limit.

Which replica: the one holding the sweeper lease, ``leases/sweeper``, an
object created create-only and renewed by compare-and-swap on its ETag
(If-Match), holding its holder and a wall-clock expiry; when its holder
dies, the first replica to find it expired takes it over the same way, so
one replica wins however many try.  Every replica tries once a sweep
interval; a sweep renews the lease as it goes and stops if it lost it.

Last use: S3 keeps no access time, and an object's LastModified is when it
was uploaded.  So each replica records its own uses of a blob (served from
either level, or redirected to the bucket) as an empty object
``uses/<alg>/<xx>/<hex>``, whose LastModified is the use: at most once per
blob per sweep interval, from a bounded table, so recording costs one
small PUT per blob and interval, never one per request.  A blob's last use
is the later of its own LastModified and its record's.  The listings of
``blobs/`` and ``uses/`` come in the same key order (S3 lists keys in
order), so the sweep walks both at once, page by page, and keeps only the
least recently used candidates (at most MAX_EVICTIONS a sweep) whatever
the bucket holds.

Never evicted: a blob used within the grace (two sweep intervals, plus a
presigned URL's life when redirects are on: a redirected client must find
its blob), or one whose download lease (``leases/<alg>/<hex>``,
regcache.leases) is live.  A record whose blob is gone is removed.  Only
blobs count towards the limit: manifests and tags are small.  Eviction
loses nothing but a copy: the blob is fetched again on its next miss.
Bucket lifecycle rules are the backstop for what regcache cannot do
(docs/shared-level.md).
"""

import heapq
import secrets
from datetime import datetime
from collections import OrderedDict
from typing import List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from regcache.leases import LEASE_TYPE, Lease, lease_name
from regcache.reference import Digest
from regcache.s3 import Listed, StorageError

LEASE = "leases/sweeper"
BLOBS = "blobs/"
USES = "uses/"
#: Keys asked for per listing page.
PAGE = 1000
#: Blobs evicted (and so kept as candidates) per sweep at most; the next
#: sweep goes on where the limit is still passed.
MAX_EVICTIONS = 1000
#: Records of blobs no longer in the bucket removed per sweep at most.
MAX_ORPHANS = 1000
#: Use records being written at once; past it, a use goes unrecorded (the
#: next one, an interval on, is).
MAX_RECORDING = 16
#: Blobs whose last recorded use this replica remembers.
MAX_REMEMBERED = 10000


def use_name(digest: Digest) -> str:
    return f"{USES}{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def _seconds(modified: str) -> float:
    """An S3 LastModified (ISO 8601, UTC) in seconds since the epoch; 0 when unreadable (oldest)."""
    try:
        return datetime.fromisoformat(modified.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class Uses:
    """This replica's record in the bucket of when it last used each blob."""

    log = Logger()

    def __init__(self, bucket, reactor, every: float):
        self.bucket = bucket
        self.reactor = reactor
        self.every = every
        self._recorded: "OrderedDict[Digest, float]" = OrderedDict()
        self._writing = 0

    def used(self, digest: Digest) -> None:
        """``digest`` was served (or redirected) now: recorded unless it was within the interval."""
        now = self.reactor.seconds()
        last = self._recorded.get(digest)
        if last is not None and now - last < self.every:
            return
        if self._writing >= MAX_RECORDING:
            return
        self._recorded[digest] = now
        self._recorded.move_to_end(digest)
        while len(self._recorded) > MAX_REMEMBERED:
            self._recorded.popitem(last=False)
        self._writing += 1
        d = Deferred.fromCoroutine(self.bucket.put(use_name(digest), b""))
        d.addErrback(self._failed, digest)
        d.addBoth(self._written)

    def _failed(self, failure, digest: Digest) -> None:
        failure.trap(StorageError)
        # Unrecorded, it may be evicted a little early: a copy lost, not a pull.
        self._recorded.pop(digest, None)
        self.log.debug("Could not record the use of {digest}: {error}", digest=str(digest),
                       error=str(failure.value))

    def _written(self, _) -> None:
        self._writing -= 1


class _Listing:
    """The objects under a prefix in key order, one page in memory at a time."""

    def __init__(self, bucket, prefix: str):
        self.bucket = bucket
        self.prefix = prefix
        self._page: List[Listed] = []
        self._next: Optional[str] = None
        self._done = False

    async def next(self) -> Optional[Listed]:
        while not self._page and not self._done:
            self._page, self._next = await self.bucket.list(self.prefix, self._next, PAGE)
            self._page.reverse()
            self._done = self._next is None
        return self._page.pop() if self._page else None


class Sweeper(Service):
    """
    Keeps the bucket's blobs under ``limit`` bytes, when this replica holds
    the sweeper lease.  ``me`` names this replica in the lease (its
    advertised URL, or any name); ``redirect_expiry`` is how long a
    presigned URL works, 0 without redirects.
    """

    log = Logger()

    def __init__(self, bucket, limit: int, reactor, metrics, me: str, interval: float = 300.0,
                 redirect_expiry: float = 0.0):
        self.bucket = bucket
        self.limit = limit
        self.reactor = reactor
        self.metrics = metrics
        self.me = me
        self.interval = interval
        self.ttl = 3 * interval
        self.grace = 2 * interval + redirect_expiry
        self.token = secrets.token_hex(8)
        self._expires = 0.0
        self._loop: Optional[LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.round()))
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    async def round(self) -> None:
        """One try: take or renew the lease, and sweep if held.  Never raises: the loop would stop."""
        try:
            if not await self._hold():
                self.metrics.shared_sweeps.labels("not_holder").inc()
                return
            await self.sweep()
        except StorageError as e:
            self.metrics.shared_sweeps.labels("failed").inc()
            self.log.warn("Sweeping the bucket failed: {error}; trying again in {interval:g}s", error=str(e),
                          interval=self.interval)
            return
        self.metrics.shared_sweeps.labels("swept").inc()

    # The sweeper lease

    async def _hold(self) -> bool:
        """Whether this replica holds the sweeper lease now, taken, renewed or taken over."""
        now = self.reactor.seconds()
        expires = now + self.ttl
        body = Lease(self.me, self.token, expires).encode()
        found = await self.bucket.read(LEASE)
        if found is None:
            held = await self.bucket.put(LEASE, body, LEASE_TYPE, create_only=True)
        else:
            info, current = found
            lease = Lease.decode(current)
            if lease is not None and lease.token != self.token and lease.expires > now:
                return False
            held = await self.bucket.put(LEASE, body, LEASE_TYPE, if_match=info.etag)
        if held:
            self._expires = expires
        return held

    async def _still_held(self) -> bool:
        """Renewed when half its time is gone: a sweep of a large bucket outlasts one lease."""
        if self.reactor.seconds() < self._expires - self.ttl / 2:
            return True
        return await self._hold()

    # The sweep

    async def sweep(self) -> None:
        total, candidates, orphans = await self._survey()
        self.metrics.shared_bucket_bytes.set(total)
        excess = total - self.limit
        if orphans:
            await self._remove_records(orphans)
        if excess <= 0:
            return
        now = self.reactor.seconds()
        freed = evicted = 0
        for last, name, size in sorted(candidates):
            if freed >= excess or now - last < self.grace:
                break
            if not await self._still_held():
                self.log.info("Lost the sweeper lease mid-sweep; another replica goes on")
                break
            if await self._leased(name):
                continue
            await self.bucket.delete(name)
            await self.bucket.delete(USES + name[len(BLOBS):])
            freed += size
            evicted += 1
            self.metrics.shared_evicted.labels("blob").inc()
        self.metrics.shared_bucket_bytes.set(total - freed)
        self.log.info("Evicted {n} blobs ({freed} bytes) from the bucket: {total} bytes held, limit {limit}",
                      n=evicted, freed=freed, total=total, limit=self.limit, event="bucket_evicted")

    async def _survey(self) -> Tuple[int, List[Tuple[float, str, int]], List[str]]:
        """
        (bytes of every blob, the least recently used of them as (last
        use, name, size), records whose blob is gone), in one pass over
        both listings.
        """
        blobs, uses = _Listing(self.bucket, BLOBS), _Listing(self.bucket, USES)
        total = 0
        newest_first: List[Tuple[float, str, int]] = []  # a max-heap on last use, as negated times
        orphans: List[str] = []
        use = await uses.next()
        while True:
            blob = await blobs.next()
            if blob is None:
                break
            suffix = blob.key[len(BLOBS):]
            while use is not None and use.key[len(USES):] < suffix:
                if len(orphans) < MAX_ORPHANS:
                    orphans.append(use.key)
                use = await uses.next()
            last = _seconds(blob.modified)
            if use is not None and use.key[len(USES):] == suffix:
                last = max(last, _seconds(use.modified))
                use = await uses.next()
            total += blob.size
            heapq.heappush(newest_first, (-last, blob.key, blob.size))
            if len(newest_first) > MAX_EVICTIONS:
                heapq.heappop(newest_first)
            if not await self._still_held():
                raise StorageError("the sweeper lease was lost during the listing")
        while use is not None and len(orphans) < MAX_ORPHANS:
            orphans.append(use.key)
            use = await uses.next()
        return total, [(-t, name, size) for t, name, size in newest_first], orphans

    async def _leased(self, name: str) -> bool:
        """Whether a live download lease names the blob ``name``: its fill is under way somewhere."""
        algorithm, _, rest = name[len(BLOBS):].partition("/")
        found = await self.bucket.read(lease_name(Digest(algorithm, rest.rpartition("/")[2])))
        if found is None:
            return False
        lease = Lease.decode(found[1])
        return lease is not None and lease.expires > self.reactor.seconds()

    async def _remove_records(self, names: List[str]) -> None:
        for name in names:
            await self.bucket.delete(name)
