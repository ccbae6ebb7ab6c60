# test-case-name: tests.test_site
"""
The side facing clients: a TLS ClientHello on the plain port is answered at
once, and every request is one structured access-log event.
"""

from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

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
        its method, URI, status and length as fields.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        c = Rig().client("/v2/")
        access = [e for e in events if e.get("log_namespace") == "regcache.access"]
        self.assertEqual(len(access), 1)
        self.assertEqual(
            {k: access[0][k] for k in ("method", "uri", "status", "length")},
            {"method": "GET", "uri": "/v2/", "status": 200, "length": len(c.body())},
        )
