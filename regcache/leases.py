# test-case-name: tests.test_leases,tests.integration.test_leases_proc
"""
One upstream fetch per blob across replicas: a lease in the bucket names
the replica downloading a digest, and the others follow it (regcache.peers).

A blob neither level holds goes to ``Leases.source``.  The replica that
creates ``leases/sha256/<hex>`` create-only downloads it, renewing the
lease (compare-and-swap on the ETag it wrote) while it does, and gives it
up once the blob is in the bucket or the fill failed.  A replica that
finds a live lease forwards to its holder, which serves from its fill in
flight; one that finds an expired lease (its holder died) takes it over
with a compare-and-swap on the expired ETag, so one replica wins however
many try.  A single PUT with If-Match is the takeover, not a delete and
a create: SeaweedFS is known to honour If-Match on PUT, and one atomic
step leaves no moment in which a late delete removes the new holder's lease.

A lease holds a wall-clock expiry (``reactor.seconds()``): replicas'
clocks must agree to well within the ttl, as NTP keeps them.

The coordinator is an optimisation like the bucket: when the bucket does
not answer a claim within LEASE_DEADLINE, or the lease keeps changing
hands, this replica fetches the blob itself (a bounded duplicate fetch,
never a failed pull).
"""

import json
import secrets
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, Optional, Set, Tuple

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from regcache.peers import PeerError
from regcache.reference import Digest
from regcache.remote import BlobStream, Remote
from regcache.s3 import StorageError

#: How long a claim (usually one small conditional PUT, at most a few) may
#: take before this replica fetches alone: the deadline the shared level
#: gives a look into the bucket (regcache.shared), which comes just before
#: it on the same path.  A store on the cluster's network answers in
#: milliseconds and a cloud bucket in tens of them, yet claims over two
#: seconds were seen with three replicas, SeaweedFS and eight hashing
#: clients on one 2-core machine, each such claim falling back to a second
#: upstream fetch of a 110 MiB layer for nothing.  A bucket slower than this
#: is in trouble, and a client waiting longer for its first byte loses more
#: than the duplicate fetch a fallback costs.
LEASE_DEADLINE = 5.0

#: Leases held at once: one per fill under way that won one.  Past it, a
#: fill fetches without a lease, so the table cannot grow with client input.
MAX_HELD = 4096

#: Claims of one fetch in a row that found a live holder which could not
#: serve it (it died, or lost track of the blob), each after waiting for
#: that lease to expire, before this replica fetches alone.
MAX_ROUNDS = 3

#: The most of a lease object believed: a URL, a token and a number.
MAX_LEASE = 4096

LEASE_TYPE = "application/json"

#: What a look into the bucket gives a fill from an offset, or None.
Look = Callable[[int], Awaitable[Optional[BlobStream]]]


def lease_name(digest: Digest) -> str:
    return f"leases/{digest.algorithm}/{digest.hex}"


@dataclass(frozen=True)
class Lease:
    """What a lease object says: who downloads, its token, until when."""

    holder: str
    token: str
    expires: float

    def encode(self) -> bytes:
        return json.dumps({"holder": self.holder, "token": self.token, "expires": self.expires}).encode()

    @classmethod
    def decode(cls, body: bytes) -> Optional["Lease"]:
        """The lease ``body`` holds, or None for anything else (taken over as expired)."""
        try:
            data = json.loads(body[:MAX_LEASE])
            return cls(str(data["holder"]), str(data["token"]), float(data["expires"]))
        except (ValueError, KeyError, TypeError):
            return None


class BucketTable:
    """
    Leases as objects in the bucket, each written create-only and changed
    only by compare-and-swap on its ETag, which is what a holder keeps.
    """

    def __init__(self, bucket, clock):
        self.bucket = bucket
        self.clock = clock

    async def take(self, digest: Digest, mine: Lease) -> Tuple[Optional[str], Optional[Lease], str]:
        """
        (The ETag of ``mine`` if it is now the lease, else None; the live
        lease of another holder if there is one; how: won, taken_over or
        lost.)
        """
        name = lease_name(digest)
        for _ in range(3):
            etag = _named(await self.bucket.put_etag(name, mine.encode(), LEASE_TYPE, create_only=True))
            if etag is not None:
                return etag, None, "won"
            found = await self.bucket.read(name)
            if found is None:
                continue  # given up meanwhile: create it again
            info, body = found
            theirs = Lease.decode(body)
            if theirs is not None and theirs.expires > self.clock.seconds() and theirs.holder != mine.holder:
                return None, theirs, "lost"
            # Expired, garbled, or a past life's of this replica (which has
            # one fill per digest, and it is the one asking).
            etag = _named(await self.bucket.put_etag(name, mine.encode(), LEASE_TYPE,
                                                                  if_match=info.etag))
            if etag is not None:
                return etag, None, "taken_over"
        raise StorageError(f"the lease on {digest} changed hands too often to be taken")

    async def renew(self, digest: Digest, lease: Lease, etag: str) -> Optional[str]:
        """The new ETag, or None if the lease is no longer the one ``etag`` names."""
        return _named(await self.bucket.put_etag(lease_name(digest), lease.encode(), LEASE_TYPE,
                                                              if_match=etag))

    async def release(self, digest: Digest, etag: str) -> None:
        await self.bucket.delete(lease_name(digest), if_match=etag)


def _named(etag: Optional[str]) -> Optional[str]:
    """A written lease's ETag, which every later compare-and-swap needs; None when the write's condition failed."""
    if etag == "":
        raise StorageError("the object store named no ETag for a lease")
    return etag


class _Held:
    """A lease this replica holds: its current ETag, and the renewal timer or the renewal under way."""

    def __init__(self, lease: Lease, etag: str):
        self.lease = lease
        self.etag = etag
        self.timer = None
        self.renewing: Optional[Deferred] = None
        self.released = False


class Leases:
    """
    The coordinator of the fills (see regcache.shared.Solo for the seam):
    ``table`` where the leases live (BucketTable, or regcache.redis_leases'),
    ``me`` the URL peers reach this replica at, ``peers`` the client that
    forwards to a holder (regcache.peers.Peers).
    """

    log = Logger()

    def __init__(self, table, peers, me: str, ttl: float, reactor, metrics, deadline: float = LEASE_DEADLINE):
        self.table = table
        self.peers = peers
        self.me = me
        self.ttl = ttl
        self.reactor = reactor
        self.metrics = metrics
        self.deadline = deadline
        self._held: Dict[Digest, _Held] = {}
        #: Fetches made without a lease, until released: no more than the
        #: fills under way, and never more than MAX_HELD.
        self._alone: Set[Digest] = set()

    def fetching(self, digest: Digest) -> bool:
        """
        Whether this replica's fill of ``digest`` reads it from upstream
        itself, under its lease or alone: what is shared once it landed,
        and what a peer may be served from, as it never forwards.
        """
        return digest in self._held or digest in self._alone

    async def source(self, upstream: Remote, name: str, digest: Digest, look: Optional[Look] = None,
                     start: int = 0) -> Tuple[BlobStream, bool]:
        """
        (The stream of the blob from ``start`` or from 0, whether it is this
        replica's own upstream fetch.)  ``look`` looks into the bucket again
        after a holder failed: it may have finished meanwhile.
        """
        for _ in range(MAX_ROUNDS):
            try:
                holder = await self._claim(digest)
            except StorageError as e:
                return await self._fetch_alone(upstream, name, digest, "unavailable", str(e))
            if holder is None:
                # The holder before may have shared it and let its lease go
                # between this replica's look into the bucket and its claim.
                stream = await look(start) if look is not None else None
                if stream is not None:
                    self.release(digest)
                    return stream, False
                return await self._fetch(upstream, name, digest), True
            try:
                stream = await self.peers.open(holder.holder, digest, start,
                                               lambda offset: self._resume(upstream, name, digest, look, offset))
                return stream, False
            except PeerError as e:
                self.log.warn("Holder {holder} of the lease on {digest} cannot send it: {error}",
                              holder=holder.holder, digest=str(digest), error=str(e))
            stream = await look(start) if look is not None else None
            if stream is not None:
                return stream, False
            # A dead holder's lease expires on its own; a live one that lost
            # track of the blob gives it up as soon as it notices.
            await deferLater(self.reactor, min(max(holder.expires - self.reactor.seconds(), 0.0), self.ttl),
                             lambda: None)
        return await self._fetch_alone(upstream, name, digest, "contended",
                                 f"the lease on {digest} is held by replicas that cannot send it")

    async def _resume(self, upstream: Remote, name: str, digest: Digest, look: Optional[Look],
                      offset: int) -> BlobStream:
        """The rest of a blob after its holder failed mid-body: the bucket's copy, else a claim again."""
        stream = await look(offset) if look is not None else None
        if stream is None:
            stream, _ = await self.source(upstream, name, digest, look, offset)
        return stream

    async def _fetch_alone(self, upstream: Remote, name: str, digest: Digest, reason: str, why: str):
        self.metrics.coordinator_fallbacks.labels(reason).inc()
        if len(self._alone) < MAX_HELD:
            self._alone.add(digest)
        self.log.warn("Fetching {digest} without a lease: {why}", digest=str(digest), why=why,
                      event="coordinator_fallback", reason=reason)
        return await upstream.open_blob(name, digest), True

    async def _fetch(self, upstream: Remote, name: str, digest: Digest) -> BlobStream:
        try:
            return await upstream.open_blob(name, digest)
        except BaseException:
            # The fill fails and releases it; this is for a caller that
            # never got so far.
            self.release(digest)
            raise

    # Claims

    async def _claim(self, digest: Digest) -> Optional[Lease]:
        """None once this replica holds the lease on ``digest``, else the live lease of the holder."""
        if digest in self._held:
            return None
        if len(self._held) >= MAX_HELD:
            raise StorageError(f"{MAX_HELD} leases are held already")
        mine = Lease(self.me, secrets.token_hex(16), self.reactor.seconds() + self.ttl)
        d = Deferred.fromCoroutine(self.table.take(digest, mine))
        try:
            etag, theirs, how = await d.addTimeout(self.deadline, self.reactor)
        except TimeoutError:
            self.metrics.leases.labels("failed").inc()
            raise StorageError(f"the coordinator did not settle the lease within {self.deadline:g}s")
        except StorageError:
            self.metrics.leases.labels("failed").inc()
            raise
        self.metrics.leases.labels(how).inc()
        if theirs is not None:
            return theirs
        self._won(digest, mine, etag, how)
        return None

    def _won(self, digest: Digest, lease: Lease, etag: str, how: str) -> None:
        self.log.info("Took the lease on {digest} ({how})", digest=str(digest), how=how, event="lease")
        held = _Held(lease, etag)
        self._held[digest] = held
        self._schedule(digest, held)

    # Renewal and release

    def _schedule(self, digest: Digest, held: _Held) -> None:
        held.timer = self.reactor.callLater(self.ttl / 3, self._renew, digest, held)

    def _renew(self, digest: Digest, held: _Held) -> None:
        held.timer = None
        lease = Lease(held.lease.holder, held.lease.token, self.reactor.seconds() + self.ttl)
        d = Deferred.fromCoroutine(self.table.renew(digest, lease, held.etag))
        d.addTimeout(self.ttl / 3, self.reactor)
        held.renewing = d
        d.addCallbacks(self._renewed, self._unrenewed, (digest, held, lease), errbackArgs=(digest, held))

    def _renewed(self, etag: Optional[str], digest: Digest, held: _Held, lease: Lease) -> None:
        held.renewing = None
        if etag is None:
            # Another replica took it over: it was late, and is no longer ours.
            self.log.warn("The lease on {digest} was taken over while this replica downloads it",
                          digest=str(digest))
            if self._held.get(digest) is held:
                del self._held[digest]
            return
        held.etag, held.lease = etag, lease
        if not held.released:
            self._schedule(digest, held)

    def _unrenewed(self, failure, digest: Digest, held: _Held) -> None:
        held.renewing = None
        self.log.warn("Could not renew the lease on {digest}: {error}; trying again",
                      digest=str(digest), error=failure.getErrorMessage())
        if not held.released:
            self._schedule(digest, held)

    def release(self, digest: Digest) -> None:
        """This replica's download of ``digest`` ended: the lease goes, unless another took it over."""
        self._alone.discard(digest)
        held = self._held.pop(digest, None)
        if held is None:
            return
        held.released = True
        if held.timer is not None and held.timer.active():
            held.timer.cancel()
        held.timer = None
        # A renewal under way changes the ETag: delete what it leaves.
        after = held.renewing if held.renewing is not None else succeed(None)
        waited: Deferred = Deferred()
        after.addBoth(lambda result: (waited.callback(None), result)[1])
        # Off any client's path: more patience than a claim, still bounded.
        waited.addCallback(lambda _: Deferred.fromCoroutine(
            self.table.release(digest, held.etag)).addTimeout(self.deadline * 5, self.reactor))
        waited.addErrback(lambda f: self.log.warn(
            "Could not give up the lease on {digest}: {error}; it expires on its own",
            digest=str(digest), error=f.getErrorMessage()))
