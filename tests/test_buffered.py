# test-case-name: tests.test_buffered
"""
The bounded reader every buffered upstream body goes through, fed by hand
on a Clock: it ends at the cap, at an idle stall and at the deadline, and
says so in words.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from regcache.buffered import BodyReader
from regcache.errors import UpstreamError
from tests.support import FedBody

WHO = "upstream registry.example"


class BodyReaderTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.bodies = BodyReader(self.clock, idle=5, deadline=30)

    def message(self, d) -> str:
        return str(self.failureResultOf(d, UpstreamError).value)

    def test_whole_body(self):
        """A body that ends is returned whole, and leaves no timer behind."""
        body = FedBody(headers={"content-length": ["6"]})
        d = self.bodies.read(body, 100, WHO, "manifest")
        body.feed(b"abc")
        body.feed(b"def")
        body.end()
        self.assertEqual(self.successResultOf(d), b"abcdef")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_announced_length_past_the_cap(self):
        """A Content-Length past the cap is refused before a byte is read, and the connection dropped."""
        body = FedBody(headers={"content-length": [str(300 * 1024 * 1024)]})
        d = self.bodies.read(body, 1024, WHO, "token")
        self.assertIn("upstream registry.example sent a token larger than 1024 bytes", self.message(d))
        self.assertEqual(body.transport.producerState, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_body_past_the_cap(self):
        """An unannounced body is refused the moment it passes the cap."""
        body = FedBody()
        d = self.bodies.read(body, 10, WHO, "tag list")
        body.feed(b"x" * 10)
        self.assertNoResult(d)
        body.feed(b"x")
        self.assertEqual(self.failureResultOf(d, UpstreamError).value.status, 502)
        self.assertEqual(body.transport.producerState, "stopped")

    def test_stall(self):
        """No byte for the idle timeout fails the read at once, without waiting for the close."""
        body = FedBody()
        d = self.bodies.read(body, 100, WHO, "token")
        body.feed(b"{")
        self.clock.advance(4.9)
        body.feed(b'"')
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIn("stopped sending the token for 5 s (--idle-timeout)", self.message(d))
        self.assertEqual(body.transport.producerState, "stopped")

    def test_trickle(self):
        """A body that keeps trickling is given up at the deadline."""
        body = FedBody()
        d = self.bodies.read(body, 100, WHO, "manifest")
        for _ in range(7):
            body.feed(b"x")
            self.clock.advance(4)
        self.assertNoResult(d)
        body.feed(b"x")
        self.clock.advance(2)
        self.assertIn("took more than 30 s to send the manifest", self.message(d))

    def test_broken_body_in_words(self):
        """A connection lost mid-body fails the read in words, with no exception repr."""
        body = FedBody()
        d = self.bodies.read(body, 100, WHO, "manifest")
        body.feed(b"x")
        body.die()
        self.assertEqual(self.message(d), "upstream registry.example closed the connection mid-response")

    def test_late_close_is_ignored(self):
        """The close that follows a give-up changes nothing."""
        body = FedBody()
        d = self.bodies.read(body, 1, WHO, "token")
        body.feed(b"xx")
        body.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionError("reset"))])))
        self.assertIn("larger than", self.message(d))

    def test_discard(self):
        """An error page is read and dropped; one too big or too slow is given up quietly."""
        small = FedBody(headers={"content-length": ["5"]})
        d = Deferred.fromCoroutine(self.bodies.discard(small, WHO))
        small.feed(b"oops!")
        small.end()
        self.assertIsNone(self.successResultOf(d))
        endless = FedBody()
        d = Deferred.fromCoroutine(self.bodies.discard(endless, WHO))
        endless.feed(b"x" * 1024)
        self.clock.advance(30)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(endless.transport.producerState, "stopped")
