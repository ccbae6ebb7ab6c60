# test-case-name: tests.test_site
"""
The side facing clients: a TLS ClientHello on the plain port is answered at
once, and every request is one structured access-log event.
"""

import io
import json

from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from tests.support import Rig

#: The first bytes of a TLS 1.2 ClientHello record.
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


class ChannelTests(SynchronousTestCase):
    def test_tls_client_hello_on_a_plain_port_is_refused_at_once(self):
        """
        A client that starts TLS on the plain-HTTP port gets Go's 400 and a
        closed connection at once, so it falls back to HTTP without
        waiting for a handshake timeout.
        """
        channel = Rig().site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(CLIENT_HELLO)
        self.assertEqual(
            transport.value(),
            b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n",
        )
        self.assertTrue(transport.disconnecting)


def _heads(raw: bytes):
    """The status line and headers (lower-cased names) of each answer in ``raw``, in order."""
    answers = []
    for part in raw.split(b"HTTP/1.")[1:]:
        head = part.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        answers.append((head[0], {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}))
    return answers


class KeepAliveTests(SynchronousTestCase):
    """
    HTTP/1.0 clients that ask for keep-alive keep their connection, as
    nginx and distribution let them, whenever the answer's end can be told
    without a close; every other HTTP/1.0 connection closes after its answer.
    """

    def _connect(self, site):
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_an_http_1_0_client_asking_for_keep_alive_keeps_its_connection(self):
        """
        Two HTTP/1.0 requests with ``Connection: keep-alive`` on one
        connection, a GET and a HEAD: both are answered, each saying
        ``Connection: Keep-Alive`` with its Content-Length, and the
        connection stays open.
        """
        channel, transport = self._connect(Rig().site)
        for method in (b"GET", b"HEAD"):
            channel.dataReceived(method + b" /v2/ HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        answers = _heads(transport.value())
        self.assertEqual([status for status, _ in answers], ["0 200 OK", "0 200 OK"])
        for _, headers in answers:
            self.assertEqual(headers.get("connection"), "Keep-Alive")
            self.assertEqual(headers.get("content-length"), "2")
        self.assertFalse(transport.disconnecting)

    def test_an_http_1_0_client_that_does_not_ask_is_closed_after_its_answer(self):
        """Without keep-alive, or with ``close`` beside it, an HTTP/1.0 connection ends with its answer."""
        for connection in (b"", b"Connection: close\r\n", b"Connection: keep-alive, close\r\n"):
            channel, transport = self._connect(Rig().site)
            channel.dataReceived(b"GET /v2/ HTTP/1.0\r\n" + connection + b"\r\n")
            ((status, headers),) = _heads(transport.value())
            self.assertEqual(status, "0 200 OK")
            self.assertNotEqual(headers.get("connection"), "Keep-Alive")
            self.assertTrue(transport.disconnecting, connection)

    def test_an_answer_without_a_length_closes_a_kept_connection(self):
        """
        An answer with a body but no Content-Length can end, for an HTTP/1.0
        client, only with a close: the connection closes even though the
        client asked to keep it, and the answer does not claim Keep-Alive.
        """
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        from regcache.metrics import Metrics
        from regcache.site import RegcacheSite

        class Unsized(Resource):
            isLeaf = True

            def render_GET(self, request):
                request.write(b"a body of no stated length")
                request.finish()
                return NOT_DONE_YET

        channel, transport = self._connect(RegcacheSite(Unsized(), Metrics(), Rig().reactor))
        channel.dataReceived(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        ((status, headers),) = _heads(transport.value())
        self.assertEqual(status, "0 200 OK")
        self.assertNotIn("connection", headers)
        self.assertTrue(transport.value().endswith(b"a body of no stated length"))
        self.assertTrue(transport.disconnecting)


class AccessLogTests(SynchronousTestCase):
    def test_each_request_is_one_structured_event(self):
        """
        A request is logged once, in the regcache.access namespace, with
        its method, path (no query), status and bytes sent as fields.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        c = Rig().client("/v2/?secret=x")
        access = [e for e in events if e.get("log_namespace") == "regcache.access"]
        self.assertEqual(len(access), 1)
        self.assertEqual(
            {k: access[0][k] for k in ("event", "method", "path", "status", "bytes")},
            {"event": "request", "method": "GET", "path": "/v2/", "status": 200, "bytes": len(c.body())},
        )


class RequestBodyTests(SynchronousTestCase):
    """
    A read-only mirror takes no request body: one announced (a
    Content-Length above zero, or any Transfer-Encoding) is refused with
    413 and an OCI error as soon as the headers are in, before a byte of
    it is read, and the connection is closed.
    """

    def send(self, head: bytes, body: bytes = b""):
        rig = Rig()
        channel = rig.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        spooled = []
        self.patch(http, "_getContentFile", lambda length: spooled.append(length) or io.BytesIO())
        channel.dataReceived(head + b"\r\n\r\n" + body)
        return rig, transport, spooled

    def assertRefused(self, rig, transport, spooled):
        raw = transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:80])
        error = json.loads(raw.split(b"\r\n\r\n", 1)[1])["errors"][0]
        self.assertEqual(error["code"], "UNSUPPORTED")
        self.assertIn("read-only", error["message"])
        self.assertIn(b"\r\nconnection: close\r\n", raw.lower())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(spooled, [], "no body was spooled")
        self.assertEqual(len(rig.upstream.calls), 0)

    def test_push_with_a_huge_content_length(self):
        """A PUT announcing 1e11 bytes is refused at its headers; the bytes that follow are dropped unread."""
        head = b"PUT /v2/library/a/blobs/uploads/x HTTP/1.1\r\nHost: m\r\nContent-Length: 100000000000"
        rig, transport, spooled = self.send(head, b"x" * 200_000)
        self.assertRefused(rig, transport, spooled)

    def test_chunked_body(self):
        """A body in any Transfer-Encoding is refused the same way, whatever the method."""
        for method, coding in ((b"POST", b"chunked"), (b"GET", b"chunked"), (b"GET", b"identity")):
            with self.subTest(method=method, coding=coding):
                head = method + b" /v2/library/a/blobs/uploads/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: " + coding
                self.assertRefused(*self.send(head, b"5\r\nhello\r\n0\r\n\r\n"))

    def test_body_on_a_health_check(self):
        """Health endpoints get the same refusal for a body; without one they answer as ever."""
        self.assertRefused(*self.send(b"GET /healthz HTTP/1.1\r\nHost: m\r\nContent-Length: 3", b"abc"))
        rig, transport, spooled = self.send(b"GET /healthz HTTP/1.1\r\nHost: m\r\nContent-Length: 0")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_refusal_is_counted_and_logged(self):
        """The refusal is one access-log event and one counted request, like any answer."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        rig, _, _ = self.send(b"PATCH /v2/library/a/blobs/uploads/x HTTP/1.1\r\nHost: m\r\nContent-Length: 9", b"123456789")
        access = [e for e in events if e.get("log_namespace") == "regcache.access"]
        self.assertEqual([(e["method"], e["status"]) for e in access], [("PATCH", 413)])
        self.assertEqual(rig.metrics.requests.labels("blobs", "PATCH", "413")._value.get(), 1)


class HostTests(SynchronousTestCase):
    """
    The Host field names no route: regcache answers alike whatever name it
    is reached by, and a field that is not a host at all (RFC 9112 §3.2)
    is a 400 before any route runs.
    """

    def send(self, *hosts: bytes) -> bytes:
        channel = Rig().site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        head = b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"Host: " + h + b"\r\n" for h in hosts)
        channel.dataReceived(head + b"\r\n")
        return transport.value()

    def test_hosts_the_router_cannot_encode_are_served(self):
        """
        Valid host names werkzeug cannot IDNA-encode (a 64-character label,
        an empty label, non-ASCII) are served as any other; they once made
        the router fail with a 500.
        """
        for host in (b"a" * 64 + b".example", b"a..b", b"mirror:5000", b"[::1]:5000", b"127.0.0.1", b""):
            with self.subTest(host=host):
                self.assertTrue(self.send(host).startswith(b"HTTP/1.1 200 "))

    def test_a_field_that_is_no_host_is_refused(self):
        """Spaces, slashes, 300 characters or two Host fields: a 400 in OCI JSON, and the connection closed."""
        for hosts in ((b"a b",), (b"evil/path",), (b"a" * 300,), (b"a", b"b"), (b"\xff",)):
            with self.subTest(hosts=hosts):
                raw = self.send(*hosts)
                self.assertTrue(raw.startswith(b"HTTP/1.1 400 "), raw[:60])
                self.assertIn(b"\r\nConnection: close\r\n", raw)
                self.assertEqual(json.loads(raw.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"], "UNSUPPORTED")

    def test_a_refused_head_has_no_body(self):
        """A HEAD refused before routing gets the error's length but no body, as any HEAD answer."""
        channel = Rig().site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"HEAD /v2/ HTTP/1.1\r\nHost: a b\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "))
        self.assertIn(b"Content-Length: ", head)
        self.assertEqual(body, b"")
