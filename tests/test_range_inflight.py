# test-case-name: tests.test_range_inflight
"""
Range on a blob that is still downloading: the same answers as for a cached
blob (PROTOCOL.md §6), each byte sent as soon as it exists except the last
of the span, which waits for the blob's digest check, and never a second
download.
"""

from twisted.trial.unittest import SynchronousTestCase

from tests.support import FedBody, Rig, blob, conformance_cases


class InFlightRangeTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.data, self.digest = blob(2048, b"in-flight")
        self.path = f"/v2/library/a/blobs/{self.digest}"

    def start(self, fed: int = 0):
        """A first client starts the download; upstream answers and sends ``fed`` bytes."""
        first = self.rig.client(self.path)
        self.body = FedBody(200, {b"Content-Length": [str(len(self.data)).encode()]})
        self.rig.upstream.answer(0, self.body)
        if fed:
            self.body.feed(self.data[:fed])
        return first

    def get(self, value):
        return self.rig.client(self.path, "GET", {"Range": value})

    def test_conformance_table_while_downloading(self):
        """
        Every row of the conformance table, asked while 1000 of 2048 bytes
        are on disk, gets the cached blob's status, Content-Range and
        Content-Length at once, and its exact bytes once they exist.
        """
        first = self.start(fed=1000)
        cases = [(self.get(value), value, status, cr, body)
                 for value, status, cr, body in conformance_cases(self.data)]
        for c, value, status, content_range, body in cases:
            self.assertEqual(c.status(), status, value)
            self.assertEqual(c.header("Content-Range"), content_range, value)
            if status == 206:
                self.assertEqual(c.header("Content-Length"), str(len(body)), value)
                self.assertEqual(c.header("Accept-Ranges"), "bytes", value)
        self.body.feed(self.data[1000:])
        self.body.end()
        for c, value, status, content_range, body in cases:
            self.assertEqual(c.body(), body, value)
            self.assertFalse(c.aborted(), value)
        self.assertEqual(first.body(), self.data)
        self.assertEqual(len(self.rig.upstream.calls), 1)

    def test_range_beyond_the_download_waits_for_its_bytes(self):
        """
        A range past what has arrived gets its headers, then nothing, then
        its bytes as upstream delivers them but the last, which waits for
        the digest check: no second upstream request.
        """
        self.start(fed=100)
        c = self.get("bytes=1000-1499")
        self.assertEqual(c.status(), 206)
        self.assertEqual(c.header("Content-Range"), "bytes 1000-1499/2048")
        self.assertEqual(c.body(), b"")
        self.body.feed(self.data[100:1200])
        self.assertEqual(c.body(), self.data[1000:1200])
        self.body.feed(self.data[1200:1600])
        self.assertEqual(c.body(), self.data[1000:1499])
        self.assertEqual(len(self.rig.upstream.calls), 1)
        self.body.feed(self.data[1600:])
        self.assertEqual(c.body(), self.data[1000:1499])
        self.body.end()
        self.assertEqual(c.body(), self.data[1000:1500])
        self.assertFalse(c.aborted())
        self.assertEqual(self.rig.blob_file(self.digest), self.data)

    def test_inner_range_of_a_bad_blob_never_completes(self):
        """
        Every span, not just one ending at the blob's end, holds its last
        byte until the whole blob matched: a mismatch anywhere aborts a
        client of an inner range one byte short, though all its bytes had
        arrived.
        """
        self.start(fed=0)
        early = self.get("bytes=0-0")
        inner = self.get("bytes=1000-1499")
        bad = bytearray(self.data)
        bad[-1] ^= 0xFF
        self.body.feed(bytes(bad))
        self.assertEqual(early.body(), b"")
        self.assertEqual(inner.body(), self.data[1000:1499])
        self.body.end()
        for c, sent in ((early, 0), (inner, 499)):
            self.assertTrue(c.aborted())
            self.assertEqual(len(c.body()), sent)
        self.assertIsNone(self.rig.blob_file(self.digest))

    def test_range_as_the_first_request_fetches_the_whole_blob(self):
        """
        A cold Range request starts one download of the whole blob (from
        byte 0, so it can be verified and cached) and gets only its span.
        """
        c = self.get("bytes=-100")
        self.assertEqual(self.rig.upstream.calls[0][2], 0)
        self.body = FedBody(200, {b"Content-Length": [b"2048"]})
        self.rig.upstream.answer(0, self.body)
        self.assertEqual(c.header("Content-Range"), "bytes 1948-2047/2048")
        self.body.feed(self.data)
        self.body.end()
        self.assertEqual(c.body(), self.data[-100:])
        self.assertEqual(self.rig.blob_file(self.digest), self.data)

    def test_last_byte_waits_for_verification(self):
        """
        A range ending at the blob's last byte gets that byte only once the
        whole blob matched its digest; on a mismatch the connection is
        aborted one byte short, so the client never takes it as complete.
        """
        self.start(fed=2000)
        c = self.get("bytes=2000-")
        bad = bytearray(self.data[2000:])
        bad[-1] ^= 0xFF
        self.body.feed(bytes(bad))
        self.assertEqual(c.body(), self.data[2000:2047])
        self.body.end()
        self.assertTrue(c.aborted())
        self.assertEqual(len(c.body()), 47)
        self.assertIsNone(self.rig.blob_file(self.digest))

    def test_waiting_range_client_hanging_up_leaves_the_download(self):
        """
        A Range client that leaves while waiting for bytes does not stop the
        download the others share.
        """
        first = self.start(fed=10)
        c = self.get("bytes=1500-")
        c.hang_up()
        self.body.feed(self.data[10:])
        self.body.end()
        self.assertEqual(first.body(), self.data)
        self.assertEqual(self.rig.blob_file(self.digest), self.data)


class EmptyBlobInFlightTests(SynchronousTestCase):
    """
    A zero-length blob has no last byte to hold back, and its headers alone
    make a complete response: they wait for the digest check instead.
    """

    def setUp(self):
        self.rig = Rig()
        self.path = "/v2/library/a/blobs/"

    def fill(self, digest):
        c = self.rig.client(self.path + str(digest))
        body = FedBody(200, {b"Content-Length": [b"0"]})
        self.rig.upstream.answer(0, body)
        return c, body

    def test_empty_blob_answers_once_verified(self):
        """Nothing is sent before the empty body matched its digest; then a clean, empty 200."""
        _, digest = blob(0)
        c, body = self.fill(digest)
        self.assertEqual(c.raw(), b"")
        body.end()
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Content-Length"), "0")
        self.assertFalse(c.aborted())
        self.assertEqual(self.rig.blob_file(digest), b"")

    def test_empty_body_for_a_digest_it_does_not_match_is_never_answered(self):
        """
        An empty body named by the digest of other bytes fails the check:
        the client's connection is aborted before any response was sent.
        """
        _, digest = blob(10, b"not empty")
        c, body = self.fill(digest)
        body.end()
        self.assertTrue(c.aborted())
        self.assertEqual(c.raw(), b"")
        self.assertIsNone(self.rig.blob_file(digest))
