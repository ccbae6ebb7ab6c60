# test-case-name: tests.test_body
"""
A download's room checks against the upstream read size, and the read-based
sender, in memory.  Real sockets (sendfile, TLS, a client that stops
reading) are in tests/integration/test_serving.py.
"""

import shutil

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from regcache import body
from regcache.expiry import Expiry
from regcache.upstream_http import UPSTREAM_READ_SIZE
from tests.integration.synthetic import store_bytes
from tests.support import FedBody, Rig, blob
from tests.test_expiry import Deferring, cache_blob

MiB = 1024 * 1024


class HeadroomTests(SynchronousTestCase):
    def test_a_download_never_takes_the_disk_past_the_limit(self):
        """
        While evicted files are still being deleted, a download whose body
        arrives in upstream socket reads (UPSTREAM_READ_SIZE each, the most
        one read from an upstream connection takes) never puts more bytes
        on disk than the size limit allows.  The store is filled so that
        the first read passes its room check with exactly the headroom
        left, the worst case: the read after it lands before the next check
        can pause the download, so it must fit in that headroom.
        """
        read = UPSTREAM_READ_SIZE
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        headroom = rig.store.index.headroom
        cached = 12
        limit = cached * read + read + headroom
        for i in range(cached):
            cache_blob(rig.store, *blob(read, b"old%d" % i))
        expiry = Expiry(rig.store, limit, rig.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        runner = Deferring()
        rig.store._run = runner
        data, digest = blob(limit - store_bytes(rig.root) + 2 * read, b"new")
        client = rig.client(f"/v2/library/a/blobs/{digest}")
        upstream = FedBody(200, {b"Content-Length": [str(len(data)).encode()]})
        rig.upstream.answer(0, upstream)
        self.assertGreater(rig.store.index.deleting, 0, "the announced size starts an eviction")
        paused = 0
        for at in range(0, len(data), read):
            upstream.feed(data[at : at + read])
            self.assertLessEqual(store_bytes(rig.root), limit)
            if upstream.transport.producerState == "paused":
                paused += 1
                runner.run_all()
                self.assertEqual(upstream.transport.producerState, "producing")
        self.assertEqual(paused, 1, "the download paused for the deletion, once")
        upstream.end()
        runner.run_all()
        self.assertEqual(client.body(), data)
        self.assertEqual(rig.blob_file(digest), data)


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
        # As a fill from library/app would leave it.
        w.links.append(("docker.io", "library/app"))
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
