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
