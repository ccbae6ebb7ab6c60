# test-case-name: tests.test_body
"""
The fast paths' settings and the read-based sender, in memory.  Real sockets
(sendfile, TLS, a client that stops reading) are in
tests/integration/test_serving.py.
"""

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from regcache import body, expiry, service
from tests.support import Rig, blob

MiB = 1024 * 1024


class SettingsTests(SynchronousTestCase):
    def test_one_upstream_read_fits_in_the_eviction_headroom(self):
        """
        A download pauses for room with CHUNK_HEADROOM to spare, because one
        more socket read may already be on its way: that read, as large as
        the upstream read size, must fit in the headroom.
        """
        self.assertGreaterEqual(expiry.CHUNK_HEADROOM, service.UPSTREAM_READ_SIZE)

    def test_sendfile_calls_are_bounded(self):
        """One sendfile call never asks for more than a few MiB."""
        self.assertLessEqual(body.SENDFILE_MAX, 4 * MiB)


class ReadSenderTests(SynchronousTestCase):
    """
    On a transport that is not plain TCP (a test transport here, TLS in
    production) a cached blob goes out through the pread producer.
    """

    def setUp(self):
        self.rig = Rig()
        self.data, self.digest = blob(3 * MiB + 7, b"read-sender")
        w = self.rig.store.new_writer(self.digest)
        w.write(self.data)
        self.assertTrue(w.matches(len(self.data)))
        w.commit()
        w.close()
        self.path = f"/v2/library/app/blobs/{self.digest}"

    def test_whole_blob_and_a_range(self):
        """The body and a range are the file's bytes, counted as 'read'."""
        c = self.rig.client(self.path)
        self.assertEqual(c.body(), self.data)
        r = self.rig.client(self.path, headers={"Range": "bytes=1048575-2097152"})
        self.assertEqual(r.status(), 206)
        self.assertEqual(r.body(), self.data[MiB - 1 : 2 * MiB + 1])
        served = self.rig.metrics.served_bytes.labels("read")._value.get()
        self.assertEqual(served, len(self.data) + MiB + 2)

    def test_full_connection_pauses_the_sender(self):
        """
        Once the connection's buffer is full the sender stops reading the
        file, and it goes on only as the client drains it: the blob never
        sits in memory, and the client still gets every byte.
        """
        transport = _FullTransport()
        channel = self.rig.site.buildProtocol(None)
        channel.makeConnection(transport)
        channel.dataReceived(f"GET {self.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        served = self.rig.metrics.served_bytes.labels("read")
        received = b""
        for _ in range(1000):
            # Stopped with one chunk at most past the buffer's limit.
            self.assertLessEqual(len(transport.value()), _FullTransport.LIMIT + body.CHUNK)
            self.assertLessEqual(served._value.get() - len(received), _FullTransport.LIMIT + body.CHUNK)
            received += transport.drain()
            if received.endswith(self.data):
                break
        self.assertTrue(received.endswith(self.data))
        self.assertEqual(served._value.get(), len(self.data))


class _FullTransport(StringTransport):
    """
    A transport that, like a real one, pauses its producer (the HTTP
    channel) when more than LIMIT bytes wait to be sent.
    """

    LIMIT = 64 * 1024

    def write(self, data):
        super().write(data)
        if self.producer is not None and len(self.value()) > self.LIMIT:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The client reads everything; the channel may go on."""
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data
