# test-case-name: tests.test_shared,tests.integration.test_shared_proc
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

from typing import Dict, Optional, Tuple

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from regcache.reference import Digest
from regcache.remote import BlobStream, Remote
from regcache.s3 import S3, StorageError
from regcache.upstream import ResponseStream

#: The media type blobs are stored under: their own is the manifest's to say.
BLOB_TYPE = "application/octet-stream"


def blob_name(digest: Digest) -> str:
    """Where a blob lives in the bucket: sharded by the digest's first byte, as distribution lays them out."""
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


class Solo:
    """
    No coordination: this replica downloads whatever it misses.  What a
    replica does alone, and what it falls back to when its coordinator
    cannot answer in time.
    """

    async def source(self, upstream: Remote, name: str, digest: Digest) -> Tuple[BlobStream, bool]:
        """
        (The stream of the blob's bytes, whether this replica fetched it
        from upstream and so must share it.)
        """
        return await upstream.open_blob(name, digest), True

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

    # Reading

    async def _within(self, d: Deferred, what: str):
        """``d``'s result, or StorageError once the deadline has passed."""
        try:
            return await d.addTimeout(self.deadline, self.reactor)
        except TimeoutError:
            raise StorageError(f"the object store did not answer {what} within {self.deadline:g}s")

    async def _bucket_stream(self, upstream: Remote, name: str, digest: Digest, start: int) -> Optional[BlobStream]:
        """The bucket's copy of ``digest`` from ``start``, resumed there, or None if it has none."""
        opened = await self._within(Deferred.fromCoroutine(self.bucket.open(blob_name(digest), start)),
                                    f"GET {blob_name(digest)}")
        if opened is None:
            return None
        info, response = opened

        async def resume(offset: int) -> BlobStream:
            try:
                stream = await self._bucket_stream(upstream, name, digest, offset)
            except StorageError as e:
                stream = None
                self.log.warn("Reading {digest} from the bucket failed at byte {offset}: {error}; "
                              "upstream sends the rest", digest=str(digest), offset=offset, error=str(e))
            if stream is None:
                # The fill skips what it already has of a whole blob.
                return await upstream.open_blob(name, digest)
            return stream

        return ResponseStream(response, info.size, start, "bucket", self.idle, resume)

    async def open_blob(self, upstream: Remote, name: str, digest: Digest) -> BlobStream:
        """
        Where a fill of ``digest`` reads from: the bucket's copy if it has
        one, else whoever the coordinator says.
        """
        try:
            stream = await self._bucket_stream(upstream, name, digest, 0)
        except StorageError as e:
            self.metrics.shared_lookups.labels("blob", "failed").inc()
            self.log.warn("The bucket cannot be read for {digest}: {error}; asking upstream",
                          digest=str(digest), error=str(e))
            stream = None
        else:
            self.metrics.shared_lookups.labels("blob", "hit" if stream is not None else "miss").inc()
        if stream is not None:
            self._fetched[digest] = False
            return stream
        stream, fetched = await self.coordinator.source(upstream, name, digest)
        self._fetched[digest] = fetched
        return stream

    async def blob_size(self, digest: Digest) -> Optional[int]:
        """The size of the bucket's copy of ``digest``, for a HEAD: None when it has none or cannot say."""
        try:
            info = await self._within(Deferred.fromCoroutine(self.bucket.head(blob_name(digest))),
                                      f"HEAD {blob_name(digest)}")
        except StorageError as e:
            self.metrics.shared_lookups.labels("blob_head", "failed").inc()
            self.log.warn("The bucket cannot be asked about {digest}: {error}", digest=str(digest), error=str(e))
            return None
        self.metrics.shared_lookups.labels("blob_head", "hit" if info is not None else "miss").inc()
        return info.size if info is not None and info.size >= 0 else None

    # Writing

    def landed(self, digest: Digest, size: int) -> None:
        """
        A fill of ``digest`` landed, verified, in the local store: if this
        replica fetched it from upstream, share it, then give the lease up.
        """
        if not self._fetched.pop(digest, False):
            self.coordinator.release(digest)
            return
        unpin = self.store.pin(digest)
        d = Deferred.fromCoroutine(self._upload(digest, size))
        d.addBoth(lambda result: (unpin(), self.coordinator.release(digest), result)[2])

    def failed(self, digest: Digest) -> None:
        """A fill of ``digest`` failed: nothing to share, and the lease is given up for another to try."""
        self._fetched.pop(digest, None)
        self.coordinator.release(digest)

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
        deadline: None if it has none; StorageError if it cannot say.
        """
        return await self._within(Deferred.fromCoroutine(self.bucket.head(blob_name(digest))),
                                  f"HEAD {blob_name(digest)}")

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
