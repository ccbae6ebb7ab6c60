# test-case-name: tests.test_verify_bucket,tests.integration.test_shared_proc
"""
``regcache verify`` for the shared level: every blob and manifest object in
the bucket read back, hashed and measured against its name.

The replicas check what they read from the bucket before they commit it,
so a bad object never reaches a client; but it is read, refused and fetched
from upstream again by every replica that misses it, and since uploads are
create-only, no good copy can ever take its place.  So a bad object is
deleted, if it is still the one that was read (its ETag), and the next
replica that fetches the content uploads it anew.

Objects are listed a page at a time (``S3.list``) and read as streams,
hashed a chunk at a time, a few at once: memory stays bounded however large
the bucket or its objects.  A read that stalls for ``IDLE`` seconds counts
as unreadable, not as bad: nothing is deleted for the bucket's slowness.
"""

from dataclasses import dataclass, field
from typing import List, Optional, TextIO

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from regcache.reference import ALGORITHMS, Digest, InvalidReference
from regcache.s3 import StorageError

#: The kinds of object whose names are their content's digest.
KINDS = ("blobs", "manifests")

#: Seconds without a byte before an object's read is given up.
IDLE = 30.0


@dataclass
class BucketReport:
    checked: int = 0
    bytes: int = 0
    corrupt: List[str] = field(default_factory=list)
    strays: List[str] = field(default_factory=list)
    unreadable: List[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.corrupt) + len(self.strays) + len(self.unreadable)


def object_digest(name: str) -> Optional[Digest]:
    """The digest a ``blobs/`` or ``manifests/`` object's name stands for, or None for a name regcache never writes."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] not in KINDS or parts[1] not in ALGORITHMS:
        return None
    try:
        digest = Digest.parse(f"{parts[1]}:{parts[3]}")
    except InvalidReference:
        return None
    return digest if parts[2] == digest.hex[:2] else None


class _Hashing(Protocol):
    """Hashes a body as it arrives; ``done`` fires with (hex digest, length), or fails if it broke or stalled."""

    def __init__(self, digest: Digest, clock, idle: float):
        self.done: Deferred = Deferred()
        self._hasher = digest.hasher()
        self._length = 0
        self._clock = clock
        self._idle = idle
        self._timer = None
        self._stalled = False

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._idle, self._stall)

    def _stall(self) -> None:
        self._timer = None
        self._stalled = True
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle)
        self._hasher.update(data)
        self._length += len(data)

    def connectionLost(self, reason) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._stalled:
            self.done.errback(StorageError(f"the object store sent nothing for {self._idle:g}s"))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback((self._hasher.hexdigest(), self._length))
        else:
            self.done.errback(StorageError(f"the object store broke off: {reason.getErrorMessage()}"))


class BucketCheck:
    """One pass over a bucket (regcache.s3.S3, or anything with its list, open and delete)."""

    def __init__(self, bucket, out: TextIO, clock, jobs: int = 4, idle: float = IDLE):
        self.bucket = bucket
        self.out = out
        self.clock = clock
        self.idle = idle
        self.report = BucketReport()
        self._jobs = DeferredSemaphore(max(1, jobs))

    async def run(self) -> BucketReport:
        """Check every object under ``blobs/`` and ``manifests/``; StorageError if the bucket cannot be listed."""
        for kind in KINDS:
            token = None
            while True:
                page, token = await self.bucket.list(kind + "/", after=token)
                await gatherResults([self._jobs.run(lambda o=o: Deferred.fromCoroutine(self._check(o)))
                                     for o in page], consumeErrors=True)
                if token is None:
                    break
        r = self.report
        self.out.write(f"bucket: checked {r.checked} objects, {r.bytes} bytes: {len(r.corrupt)} corrupt, "
                       f"{len(r.strays)} stray, {len(r.unreadable)} unreadable\n")
        return r

    async def _check(self, listed) -> None:
        name = listed.key
        digest = object_digest(name)
        if digest is None:
            self.report.strays.append(name)
            self.out.write(f"bucket: stray object, not a digest: {name}\n")
            return
        try:
            opened = await self.bucket.open(name)
            if opened is None:
                return  # evicted since the listing
            info, response = opened
            protocol = _Hashing(digest, self.clock, self.idle)
            response.deliverBody(protocol)
            hexdigest, length = await protocol.done
        except StorageError as e:
            self.report.unreadable.append(name)
            self.out.write(f"bucket: cannot read {name}: {e}\n")
            return
        self.report.checked += 1
        self.report.bytes += length
        if hexdigest == digest.hex and info.size in (length, -1):
            return
        self.report.corrupt.append(name)
        self.out.write(f"bucket: corrupt: {name} ({length} bytes read, {info.size} announced)\n")
        try:
            if not await self.bucket.delete(name, if_match=info.etag or None):
                self.out.write(f"bucket: {name} was replaced meanwhile, and is left\n")
        except StorageError as e:
            self.out.write(f"bucket: could not delete {name}: {e}\n")
