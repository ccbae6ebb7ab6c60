# test-case-name: tests.test_exchange
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

from regcache.exchange import Limits
from regcache.errors import UpstreamError, UpstreamTimeout
from tests.support import FedBody

WHO = "upstream registry.example"


class BodyReaderTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.bodies = Limits(self.clock, header=5, idle=5, deadline=30)

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


def _failing(exc):
    from twisted.internet.defer import fail

    return fail(exc)


class AnswerTests(SynchronousTestCase):
    """The wait for a response's headers: a deadline, and every transport failure in words."""

    def setUp(self):
        self.clock = Clock()
        self.limits = Limits(self.clock, header=5, idle=5, deadline=30)

    def answer(self, request):
        return Deferred.fromCoroutine(self.limits.answer(lambda: request, WHO, "sending GET /v2/"))

    def test_header_deadline(self):
        """
        No answer within the header timeout is an UpstreamTimeout in words,
        even when the cancelled request fails with the HTTP client's wrapper.
        """
        from twisted.internet.defer import CancelledError

        request = Deferred(lambda d: d.errback(ResponseFailed([Failure(CancelledError())])))
        d = self.answer(request)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, UpstreamTimeout).value
        self.assertEqual(str(error), "upstream registry.example did not answer within 5 s (--header-timeout)")

    def test_request_refused_at_once(self):
        """An HTTP client that raises instead of returning a Deferred still gives an UpstreamError."""
        def send():
            raise ValueError("invalid URL")

        d = Deferred.fromCoroutine(self.limits.answer(send, WHO, "sending GET /v2/"))
        self.assertEqual(str(self.failureResultOf(d, UpstreamError).value),
                         "the exchange with upstream registry.example failed unexpectedly")

    def test_transport_failures_in_words(self):
        """Each failure Twisted's Agent reports (shapes taken from real sockets) becomes a sentence."""
        from OpenSSL.SSL import Error as TLSError
        from service_identity.exceptions import VerificationError
        from twisted.internet import error
        from twisted.web._newclient import ParseError
        from twisted.web.client import ResponseNeverReceived
        from twisted.web.http import _DataLoss

        never = lambda *e: ResponseNeverReceived([Failure(x) for x in e])
        failed = lambda *e: ResponseFailed([Failure(x) for x in e])
        cases = [
            (error.ConnectionRefusedError("Connection refused"), "upstream registry.example refused the connection"),
            (error.DNSLookupError("no results for hostname lookup: registry.example"),
             "DNS lookup of upstream registry.example failed"),
            (error.TimeoutError("User timeout caused connection failure."),
             "upstream registry.example could not be reached within the connect timeout (--connect-timeout)"),
            (never(TLSError([("SSL routines", "", "certificate verify failed")])),
             "TLS certificate of upstream registry.example could not be verified"),
            (never(VerificationError([])), "TLS certificate of upstream registry.example could not be verified"),
            (never(TLSError([("SSL routines", "", "wrong version number")])),
             "TLS handshake with upstream registry.example failed"),
            (never(error.ConnectionDone()), "upstream registry.example closed the connection before answering"),
            (failed(error.ConnectionDone()), "upstream registry.example closed the connection mid-response"),
            (failed(error.ConnectionDone(), _DataLoss()),
             "upstream registry.example closed the connection mid-response"),
            (failed(ParseError("wrong number of parts", b"SSH-2.0-OpenSSH")),
             "upstream registry.example sent a malformed HTTP response"),
            (failed(ValueError("not enough values to unpack")),
             "upstream registry.example sent a malformed HTTP response"),
            (error.NoRouteError(), "upstream registry.example could not be reached"),
            (RuntimeError("something else"), "the exchange with upstream registry.example failed unexpectedly"),
        ]
        for exc, words in cases:
            error_ = self.failureResultOf(self.answer(_failing(exc)), UpstreamError).value
            self.assertNotIsInstance(error_, UpstreamTimeout)
            self.assertEqual(str(error_), words)
