# test-case-name: tests.test_shared_faults
"""
The shared level (regcache.shared) in front of a bucket that lies, stalls
or is slow, with the real mirror, fills, store and S3 client over a
hand-fed bucket and upstream: the bucket may cost time, never a pull that
would have succeeded without it.
"""

from types import SimpleNamespace

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from regcache.s3 import S3, BucketSettings
from regcache.shared import SharedLevel
from tests.support import FedBody, Rig, blob, inline

MiB = 1024 * 1024
SETTINGS = BucketSettings("http://store.test:8333", "cache", "id", "secret")


class BucketBody(FedBody):
    """A FedBody answering a bucket request (S3's client reads ``response.request.method``)."""

    def __init__(self, code=200, headers=None, method=b"GET"):
        super().__init__(code, headers)
        self.request = SimpleNamespace(method=method)
        self.phrase = b"OK"
        # As Twisted's client does: a body reader that stops producing
        # loses the connection.
        self.transport.stopProducing = self.die
        self.ended = False

    def end(self):
        if not self.ended:
            self.ended = True
            super().end()

    def die(self):
        if not self.ended and self.protocol is not None:
            self.ended = True
            super().die()


class HandFedBucket:
    """A treq-like client: every request is recorded and answered when the test says so."""

    def __init__(self):
        self.calls = []  # (method, url, headers, data, Deferred)

    def request(self, method, url, headers=None, data=None, allow_redirects=True, unbuffered=False):
        d = Deferred()
        self.calls.append((method, url, {k.decode(): v[0].decode() for k, v in (headers or {}).items()}, data, d))
        return d

    def gets(self):
        return [c for c in self.calls if c[0] == "GET"]

    def answer(self, call, body):
        call[4].callback(body)

    def written(self, call):
        """Answer a PUT: 200, with an empty body."""
        body = BucketBody(200, {b"Content-Length": [b"0"]}, method=b"PUT")
        call[4].callback(body)
        body.end()


def blob_path(digest):
    return f"/v2/library/app/blobs/{digest}"


class SharedRig(Rig):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.bucket = HandFedBucket()
        self.s3 = S3(SETTINGS, self.bucket, self.reactor, inline)
        self.shared = SharedLevel(self.s3, self.store, self.metrics, self.reactor)
        self.fills.shared = self.shared

    def get(self, digest, size):
        """A client GET of ``digest``, its repository confirmed by upstream's HEAD (no manifest names it)."""
        c = self.client(blob_path(digest))
        heads = [h for h in self.upstream.heads if not h[2].called]
        for h in heads:
            h[2].callback(size)
        return c


class LyingBucketTests(SynchronousTestCase):
    def setUp(self):
        self.rig = SharedRig()
        self.data, self.digest = blob(2 * MiB)

    def _length(self, n=None):
        return {b"Content-Length": [str(len(self.data) if n is None else n).encode()]}

    def test_a_corrupt_bucket_copy_does_not_fail_every_later_pull(self):
        """
        The bucket holds wrong bytes under a digest (SeaweedFS stores a PUT
        whatever its payload hash).  The first fill from it fails its
        verification (its clients were sent wrong bytes: they are aborted);
        the next request must not read the same wrong copy again and fail
        the same way for ever, on every replica: it goes upstream.
        """
        first = self.rig.get(self.digest, len(self.data))
        (get,) = self.rig.bucket.gets()
        bad = BucketBody(200, self._length())
        self.rig.bucket.answer(get, bad)
        bad.feed(b"\0" * len(self.data))
        bad.end()
        self.assertTrue(first.aborted())
        self.assertIsNone(self.rig.blob_file(self.digest))

        again = self.rig.get(self.digest, len(self.data))
        # The bucket's copy is known to be wrong: not read again.
        for call in self.rig.bucket.gets()[1:]:
            body = BucketBody(200, self._length())
            self.rig.bucket.answer(call, body)
            body.feed(b"\0" * len(self.data))
            body.end()
        self.assertEqual(len(self.rig.upstream.calls), 1, "the second pull never reached upstream")
        good = FedBody(200, self._length())
        self.rig.upstream.answer(0, good)
        good.feed(self.data)
        good.end()
        self.assertFalse(again.aborted())
        self.assertEqual(again.body(), self.data)
        self.assertEqual(self.rig.blob_file(self.digest), self.data)

    def test_a_bucket_that_hangs_after_its_headers_gives_way_to_upstream(self):
        """
        The bucket answers a GET's headers, then sends nothing, and so does
        each Range GET that resumes it.  Without the bucket the pull would
        have succeeded: after the bucket's stall the blob comes from
        upstream, and the fill lands instead of failing after three stalls.
        """
        c = self.rig.get(self.digest, len(self.data))
        for _ in range(6):
            pending = [g for g in self.rig.bucket.gets() if not g[4].called]
            for call in pending:
                ranged = "Range" in call[2]
                self.rig.bucket.answer(call, BucketBody(
                    206 if ranged else 200,
                    {b"Content-Range": [f"bytes 0-{len(self.data) - 1}/{len(self.data)}".encode()],
                     **self._length()} if ranged else self._length()))
            if self.rig.upstream.calls:
                break
            self.rig.reactor.advance(16)
        self._upstream_finishes(c)

    def _upstream_finishes(self, c):
        """The fill asked upstream once; upstream sends the blob, which lands and reaches the client whole."""
        self.assertEqual(len(self.rig.upstream.calls), 1, "the fill never asked upstream")
        good = FedBody(200, self._length())
        self.rig.upstream.answer(0, good)
        good.feed(self.data)
        good.end()
        self.assertEqual(self.rig.blob_file(self.digest), self.data)
        self.assertEqual(c.body(), self.data)

    def test_a_bucket_that_drips_gives_way_to_upstream(self):
        """
        The bucket sends a few bytes every 10 s (never idle long enough to
        stall, far under the rate floor), from every Range GET too.  The
        fill must end up reading upstream and land, not give up after
        three slow windows all spent on the bucket.
        """
        c = self.rig.get(self.digest, len(self.data))
        bodies = []
        written = 0
        for _ in range(60):
            for call in [g for g in self.rig.bucket.gets() if not g[4].called]:
                at = int(call[2]["Range"][len("bytes="):-1]) if "Range" in call[2] else 0
                headers = {b"Content-Length": [str(len(self.data) - at).encode()]}
                if at:
                    headers[b"Content-Range"] = [f"bytes {at}-{len(self.data) - 1}/{len(self.data)}".encode()]
                body = BucketBody(206 if at else 200, headers)
                self.rig.bucket.answer(call, body)
                bodies.append((body, at))
            if self.rig.upstream.calls or c.aborted():
                break
            body, at = bodies[-1]
            if not body.ended:
                sent = written - at if written > at else 0
                body.feed(self.data[at + sent:at + sent + 100])
                written = at + sent + 100
            self.rig.reactor.advance(10)
        self._upstream_finishes(c)

    def test_a_bucket_that_streams_without_content_length(self):
        """
        A GET answered without Content-Length (chunked, as a proxy or
        GCS's transcoding may send it) is a stream of unknown length, not
        of length -1: the blob verifies and lands.
        """
        c = self.rig.get(self.digest, len(self.data))
        (get,) = self.rig.bucket.gets()
        body = BucketBody(200)
        self.rig.bucket.answer(get, body)
        body.feed(self.data)
        body.end()
        self.assertEqual(self.rig.blob_file(self.digest), self.data)
        self.assertFalse(c.aborted())
        self.assertEqual(c.body(), self.data)


class DeadBucketTests(SynchronousTestCase):
    def test_a_bucket_that_does_not_answer_is_remembered(self):
        """
        A bucket that does not answer at all (a partition, a blackholed
        address) costs a miss its 2 s deadline.  As a sick upstream is
        remembered, it must not cost every following miss (and every HEAD)
        the same 2 s: the next miss soon after goes upstream at once.
        """
        rig = SharedRig()
        (d1, s1), (d2, s2) = blob(1024, b"one"), blob(1024, b"two")
        first = rig.get(s1, len(d1))
        self.assertEqual(len(rig.bucket.gets()), 1)
        rig.reactor.advance(2.1)
        self.assertEqual(len(rig.upstream.calls), 1)
        second = rig.get(s2, len(d2))
        self.assertEqual(len(rig.upstream.calls), 2, "the second miss waited for the dead bucket again")
        for i, data in enumerate((d1, d2)):
            body = FedBody(200, {b"Content-Length": [str(len(data)).encode()]})
            rig.upstream.answer(i, body)
            body.feed(data)
            body.end()
        self.assertEqual((first.body(), second.body()), (d1, d2))


class UploadTests(SynchronousTestCase):
    def setUp(self):
        self.rig = SharedRig()
        self.data, self.digest = blob(MiB)

    def test_shutdown_waits_for_an_upload_under_way(self):
        """
        A blob fetched from upstream lands locally, then goes up to the
        bucket.  A rolling restart (FillDrain) waits for the fills; it
        must wait for the upload too, or the blob is in neither level once
        the pod's emptyDir is gone and the next replica pulls it again.
        """
        c = self.rig.get(self.digest, len(self.data))
        (get,) = self.rig.bucket.gets()
        self.rig.bucket.answer(get, BucketBody(404, {b"Content-Length": [b"0"]}))
        good = FedBody(200, {b"Content-Length": [str(len(self.data)).encode()]})
        self.rig.upstream.answer(0, good)
        good.feed(self.data)
        good.end()
        self.assertEqual(c.body(), self.data)
        puts = [call for call in self.rig.bucket.calls if call[0] == "PUT"]
        self.assertEqual(len(puts), 1)
        drained = self.rig.fills.drain()
        self.assertNoResult(drained)
        self.rig.bucket.written(puts[0])
        self.successResultOf(drained)

    def test_uploads_to_a_slow_bucket_are_bounded(self):
        """
        A bucket that takes its time over PUTs (it answers only once it has
        every byte, at whatever rate it likes): each blob landed from
        upstream starts an upload that pins the blob until it ends.  They
        must not all run at once: every one holds a connection, a
        descriptor and a pin, and pinned blobs cannot be evicted, so the
        local level (an emptyDir with a size limit) would grow past its
        limit while the bucket is slow.
        """
        blobs = [blob(64 * 1024, seed=b"%d" % i) for i in range(12)]
        for i, (data, digest) in enumerate(blobs):
            c = self.rig.get(digest, len(data))
            get = [g for g in self.rig.bucket.gets() if not g[4].called][0]
            self.rig.bucket.answer(get, BucketBody(404, {b"Content-Length": [b"0"]}))
            body = FedBody(200, {b"Content-Length": [str(len(data)).encode()]})
            self.rig.upstream.answer(i, body)
            body.feed(data)
            body.end()
            self.assertEqual(c.body(), data)
        puts = [call for call in self.rig.bucket.calls if call[0] == "PUT"]
        self.assertLessEqual(len(puts), 4, "one upload under way per landed blob, however slow the bucket")
        self.assertLessEqual(len(self.rig.store.index.pins), 4)
        # Each upload still happens, in turn.
        done = 0
        while True:
            pending = [call for call in self.rig.bucket.calls if call[0] == "PUT" and not call[4].called]
            if not pending:
                break
            for call in pending:
                self.rig.bucket.written(call)
                done += 1
        self.assertEqual(done, len(blobs))
        self.assertEqual(self.rig.store.index.pins, {})
