# test-case-name: tests.test_shared,tests.test_shared_faults,tests.integration.test_shared_proc
"""
The shared level: a bucket every replica reads and fills, behind each
replica's own store.

A blob the local store lacks is looked for in the bucket before anyone asks
upstream; only a miss in both goes to the coordinator (regcache.leases),
which has one replica download it while the others follow that one.  The
bytes from the bucket go through the same fill as upstream's, so they
stream to the clients and the local disk at once and are checked against
their digest before anything is committed: the bucket is trusted no more
than upstream (SeaweedFS stores a PUT whatever its payload hash).  A blob
this replica fetched from upstream goes up to the bucket once it landed
and verified, create-only, so a second copy never overwrites the first.

The bucket is an optimisation, never a dependency: when it fails or is late
the blob comes from upstream as it would without it, a pull never fails
for it, and a blob that could not be uploaded is only not shared.
"""

from collections import OrderedDict, deque
from typing import Deque, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.logger import Logger

from regcache.errors import IntegrityError

from regcache.reference import Digest
from regcache.remote import BlobStream, Remote
from regcache.s3 import S3, StorageError
from regcache.upstream import ResponseStream

#: The media type blobs are stored under: their own is the manifest's to say.
BLOB_TYPE = "application/octet-stream"

#: How a fill's source names the bucket (and, with this prefix, another replica).
BUCKET = "bucket"
PEER = "peer "

#: Resumes of a bucket read from the bucket, per fill, after which the rest
#: comes from upstream; a bucket read that made no progress at all is
#: resumed from upstream at once.  Fewer than a fill's stalls in a row
#: (Fill.MAX_STALLED_RESUMES), so that a bucket that stalls or drips costs
#: a little time, never the pull.
MAX_BUCKET_RESUMES = 1

#: Copies in the bucket a fill found wrong (or failed on), not read again
#: for DISTRUST_SECONDS: the next fill of the digest goes upstream.  At most
#: this many are remembered, the oldest forgotten first.
MAX_DISTRUSTED = 4096
DISTRUST_SECONDS = 600.0

#: After the bucket did not answer (a timeout, a refused or reset
#: connection), reads skip it for this long, doubling while it stays
#: silent up to MAX_BREAK; one read then probes it, and an answer ends the
#: break.  A blackholed bucket costs one deadline, not one per miss.
BREAK = 2.0
MAX_BREAK = 60.0

#: Uploads to the bucket at once; the rest wait their turn unpinned (a blob
#: evicted meanwhile is only not shared), at most MAX_QUEUED of them, the
#: oldest given up first.  Each upload under way holds a connection, a
#: descriptor and a pin that keeps its blob from eviction.
MAX_UPLOADS = 4
MAX_QUEUED = 10_000


def blob_name(digest: Digest) -> str:
    """Where a blob lives in the bucket: sharded by the digest's first byte, as distribution lays them out."""
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


class Solo:
    """
    No coordination: this replica downloads whatever it misses.  What a
    replica does alone, and what it falls back to when its coordinator
    cannot answer in time.
    """

    async def source(self, upstream: Remote, name: str, digest: Digest, look=None) -> Tuple[BlobStream, bool]:
        """
        (The stream of the blob's bytes, whether this replica fetched it
        from upstream and so must share it.)  ``look(offset)`` is the
        bucket's copy from an offset, or None: for a coordinator whose
        source fails mid-body and looks again before it asks anyone else.
        """
        return await upstream.open_blob(name, digest), True

    def fetching(self, digest: Digest) -> bool:
        """
        Whether a fill of ``digest`` turned to upstream after it began on
        another source; alone, a fill's first source is its only one.
        """
        return False

    def release(self, digest: Digest) -> None:
        """This replica's download of ``digest`` ended, shared or not."""


class SharedLevel:
    """
    The bucket as the fills' source of blobs and their destination once
    verified.  ``deadline`` bounds each look into the bucket on a client's
    path; ``idle`` is the stall that ends a bucket read (it then resumes).
    """

    log = Logger()

    def __init__(self, bucket: S3, store, metrics, reactor, coordinator=None, deadline: float = 2.0,
                 idle: float = 15.0):
        self.bucket = bucket
        self.store = store
        self.metrics = metrics
        self.reactor = reactor
        self.coordinator = coordinator or Solo()
        self.deadline = deadline
        self.idle = idle
        #: Per fill under way: whether it holds this replica's own upstream
        #: fetch, which is the one to share.  A fill ends in ``landed`` or
        #: ``failed``, so this is no bigger than the fills.
        self._fetched: Dict[Digest, bool] = {}
        #: The ETag of the bucket copy a fill under way reads, by digest.
        self._read: Dict[Digest, str] = {}
        #: Digests whose bucket copy is not to be read, until when.
        self._distrusted: "OrderedDict[Digest, float]" = OrderedDict()
        #: Reads skip the bucket until then (see BREAK), after ``_break`` s.
        self._broken_until = 0.0
        self._break = 0.0
        #: Uploads waiting their turn, (digest, size), and how many run.
        self._queue: Deque[Tuple[Digest, int]] = deque()
        self._active = 0
        #: Shutdowns waiting for the uploads to end.
        self._idle: List[Deferred] = []

    # Reading

    async def _within(self, d: Deferred, what: str):
        """``d``'s result, or StorageError once the deadline has passed."""
        try:
            return await d.addTimeout(self.deadline, self.reactor)
        except TimeoutError:
            raise StorageError(f"the object store did not answer {what} within {self.deadline:g}s")

    async def _bucket_stream(self, upstream: Remote, name: str, digest: Digest, start: int,
                             resumes: int = 0) -> Optional[BlobStream]:
        """
        The bucket's copy of ``digest`` from ``start``, or None if it has
        none.  It is resumed from the bucket only when it made progress,
        at most MAX_BUCKET_RESUMES times; else upstream sends the rest.
        """
        opened = await self._within(Deferred.fromCoroutine(self.bucket.open(blob_name(digest), start)),
                                    f"GET {blob_name(digest)}")
        if opened is None:
            return None
        info, response = opened
        self._read.setdefault(digest, info.etag)

        async def resume(offset: int) -> BlobStream:
            stream = None
            if offset > start and resumes < MAX_BUCKET_RESUMES and self._usable():
                try:
                    stream = await self._bucket_stream(upstream, name, digest, offset, resumes + 1)
                    self._answered()
                except StorageError as e:
                    self._answered(e)
                    self.log.warn("Reading {digest} from the bucket failed at byte {offset}: {error}; "
                                  "upstream sends the rest", digest=str(digest), offset=offset, error=str(e))
            else:
                self.log.warn("The bucket stalled sending {digest} at byte {offset}; upstream sends the rest",
                              digest=str(digest), offset=offset)
            if stream is None:
                # The fill skips what it already has of a whole blob.
                return await upstream.open_blob(name, digest)
            return stream

        # A GET without Content-Length (chunked) is of a size not yet known.
        total = info.size if info.size >= 0 else None
        return ResponseStream(response, total, start, BUCKET, self.idle, resume)

    def _usable(self) -> bool:
        return self.reactor.seconds() >= self._broken_until

    def _answered(self, error: Optional[StorageError] = None) -> None:
        """Note how the bucket answered a read: silence starts (or lengthens) a break, an answer ends it."""
        if error is None or error.status is not None:
            self._break = 0.0
            return
        self._break = min(max(self._break * 2, BREAK), MAX_BREAK)
        self._broken_until = self.reactor.seconds() + self._break
        self.log.warn("The bucket did not answer: reads skip it for {seconds:g}s", seconds=self._break)

    def _trusted(self, digest: Digest) -> bool:
        until = self._distrusted.get(digest)
        if until is None:
            return True
        if until <= self.reactor.seconds():
            del self._distrusted[digest]
            return True
        return False

    def _distrust(self, digest: Digest) -> None:
        self._distrusted.pop(digest, None)
        self._distrusted[digest] = self.reactor.seconds() + DISTRUST_SECONDS
        while len(self._distrusted) > MAX_DISTRUSTED:
            self._distrusted.popitem(last=False)

    async def open_blob(self, upstream: Remote, name: str, digest: Digest) -> BlobStream:
        """
        Where a fill of ``digest`` reads from: the bucket's copy if it has
        one, else whoever the coordinator says.
        """
        self._read.pop(digest, None)
        try:
            if not self._usable():
                raise StorageError("the bucket did not answer lately")
            stream = await self._bucket_stream(upstream, name, digest, 0) if self._trusted(digest) else None
            self._answered()
        except StorageError as e:
            if self._usable():
                self._answered(e)
            self.metrics.shared_lookups.labels("blob", "failed").inc()
            self.log.warn("The bucket cannot be read for {digest}: {error}; asking upstream",
                          digest=str(digest), error=str(e))
            stream = None
        else:
            self.metrics.shared_lookups.labels("blob", "hit" if stream is not None else "miss").inc()
        if stream is not None:
            self._fetched[digest] = False
            return stream
        stream, fetched = await self.coordinator.source(upstream, name, digest,
                                                        lambda offset: self._look(upstream, name, digest, offset))
        self._fetched[digest] = fetched
        return stream

    async def _look(self, upstream: Remote, name: str, digest: Digest, offset: int) -> Optional[BlobStream]:
        """
        The bucket's copy from ``offset``, or None when it has none or cannot
        say: the coordinator's second look, counted like the first, since a
        fill may read the bucket from here.
        """
        try:
            stream = await self._bucket_stream(upstream, name, digest, offset)
        except StorageError as e:
            self.metrics.shared_lookups.labels("blob", "failed").inc()
            self.log.warn("The bucket cannot be read for {digest}: {error}", digest=str(digest), error=str(e))
            return None
        self.metrics.shared_lookups.labels("blob", "hit" if stream is not None else "miss").inc()
        return stream

    async def blob_size(self, digest: Digest) -> Optional[int]:
        """The size of the bucket's copy of ``digest``, for a HEAD: None when it has none or cannot say."""
        try:
            info = await self.blob_info(digest)
        except StorageError as e:
            self.metrics.shared_lookups.labels("blob_head", "failed").inc()
            self.log.warn("The bucket cannot be asked about {digest}: {error}", digest=str(digest), error=str(e))
            return None
        self.metrics.shared_lookups.labels("blob_head", "hit" if info is not None else "miss").inc()
        return info.size if info is not None and info.size >= 0 else None

    @staticmethod
    def sent(source: str) -> Optional[str]:
        """
        "bucket" or "peer" when a fill's ``source`` is the shared level
        rather than an upstream, else None: its bytes are not upstream's.
        """
        if source == BUCKET:
            return "bucket"
        if source.startswith(PEER):
            return "peer"
        return None

    # Writing

    def landed(self, digest: Digest, size: int) -> None:
        """
        A fill of ``digest`` landed, verified, in the local store: if this
        replica fetched it from upstream, share it, then give the lease up.
        A fill that began on another replica's bytes and turned to upstream
        when they failed (regcache.leases) fetched it too.
        """
        self._read.pop(digest, None)
        fetched = self._fetched.pop(digest, False)
        if not fetched and not self.coordinator.fetching(digest):
            self.coordinator.release(digest)
            return
        self._queue.append((digest, size))
        while len(self._queue) > MAX_QUEUED:
            dropped, _ = self._queue.popleft()
            self.metrics.shared_uploads.labels("blob", "failed").inc()
            self.log.warn("Not sharing {digest}: too many uploads waiting", digest=str(dropped))
            self.coordinator.release(dropped)
        self._pump()

    def _pump(self) -> None:
        while self._active < MAX_UPLOADS and self._queue:
            digest, size = self._queue.popleft()
            if digest not in self.store.index:
                # Evicted while it waited: nothing left to share.
                self.metrics.shared_uploads.labels("blob", "failed").inc()
                self.coordinator.release(digest)
                continue
            self._active += 1
            unpin = self.store.pin(digest)
            d = Deferred.fromCoroutine(self._upload(digest, size))
            d.addErrback(lambda f, digest=digest: self.log.failure("Sharing {digest} failed", f,
                                                                   digest=str(digest)))
            d.addBoth(lambda _, digest=digest, unpin=unpin: self._uploaded(digest, unpin))
        if not self._active and not self._queue:
            idle, self._idle = self._idle, []
            for w in idle:
                w.callback(None)

    def _uploaded(self, digest: Digest, unpin) -> None:
        unpin()
        self.coordinator.release(digest)
        self._active -= 1
        self._pump()

    def failed(self, digest: Digest, error: Optional[BaseException] = None, source: Optional[str] = None) -> None:
        """
        A fill of ``digest`` failed: nothing to share, and the lease is
        given up for another to try.  If it read the bucket's copy, that
        copy is not read again for a while, so the next fill goes upstream
        instead of failing the same way; a copy whose bytes were all the
        bucket's and did not match the digest is removed from the bucket
        (if it is still that copy), so a good one can take its place.
        """
        etag = self._read.pop(digest, None)
        self._fetched.pop(digest, None)
        if etag is not None and not isinstance(error, OSError):
            # (A local disk's failure says nothing of the bucket's copy.)
            self._distrust(digest)
            if isinstance(error, IntegrityError) and source == BUCKET:
                self.log.warn("The bucket's copy of {digest} is wrong ({error}): removing it",
                              digest=str(digest), error=str(error))
                d = Deferred.fromCoroutine(self.bucket.delete(blob_name(digest), if_match=etag or None))
                d.addErrback(lambda f: self.log.warn("Could not remove the bucket's copy of {digest}: {error}",
                                                     digest=str(digest), error=f.getErrorMessage()))
        self.coordinator.release(digest)

    def uploads(self) -> Deferred:
        """A Deferred that fires once every upload under way or waiting has ended (for a shutdown to wait for)."""
        if not self._active and not self._queue:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d

    async def _upload(self, digest: Digest, size: int) -> None:
        path = self.store.blob_path(digest)
        try:
            # The payload hash signed is the content's own, when it is a sha256.
            payload = digest.hex if digest.algorithm == "sha256" else "UNSIGNED-PAYLOAD"
            created = await self.bucket.upload(blob_name(digest), path, size, payload, BLOB_TYPE)
        except (StorageError, OSError) as e:
            self.metrics.shared_uploads.labels("blob", "failed").inc()
            self.log.warn("Could not share {digest} in the bucket: {error}; other replicas fetch it themselves",
                          digest=str(digest), error=str(e))
            return
        self.metrics.shared_uploads.labels("blob", "uploaded" if created else "present").inc()
        self.log.info("Shared {digest} ({size} bytes) in the bucket", digest=str(digest), size=size,
                      event="shared", created=created)

    # For redirects (regcache.redirect)

    async def blob_info(self, digest: Digest):
        """
        The bucket's HEAD of ``digest`` (an ObjectInfo) within the
        deadline: None if it has none; StorageError if it cannot say,
        or did not answer lately (a break, as for reads).
        """
        if not self._usable():
            raise StorageError("the bucket did not answer lately")
        try:
            info = await self._within(Deferred.fromCoroutine(self.bucket.head(blob_name(digest))),
                                      f"HEAD {blob_name(digest)}")
        except StorageError as e:
            self._answered(e)
            raise
        self._answered()
        return info

    def share(self, digest: Digest, size: int) -> None:
        """
        Upload ``digest``, which the local store holds and the bucket was
        just found to lack (evicted there, or its first upload failed), as
        this replica's own fetch would be once it landed, so that other
        replicas and redirects find it again.
        """
        if digest in self._fetched:
            return  # a fill of it is under way here, and shares it when it lands
        self._fetched[digest] = True
        self.landed(digest, size)
