# test-case-name: tests.test_client_limits
"""
The limits that keep one client from holding the server: a deadline for
request headers (slowloris), a progress timeout for blob responses nobody
reads, and caps on connections in all and per address, past which health
checks still answer.  Time is the rig's clock.
"""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from regcache.inflight import RateFloor
from regcache.site import ClientLimits
from tests.support import Client, FedBody, Rig, blob


def connect(rig, address="10.0.0.1"):
    channel = rig.site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", address, 40000))
    channel.makeConnection(transport)
    return channel, transport


class FullBuffer(StringTransport):
    """A client's socket whose buffer fills with every write: the sender is paused until the test resumes it."""

    def write(self, data):
        super().write(data)
        if self.producer is not None and data:
            self.producer.pauseProducing()


def trips(rig, limit):
    return rig.metrics.client_limits.labels(limit)._value.get()


class HeadTimeoutTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.rig.site.limits = ClientLimits(head_timeout=10)

    def test_a_byte_a_second_is_cut_off_at_the_deadline(self):
        """
        A client sending its headers a byte a second (each byte would
        restart the idle timer) gets a 408 and a closed connection once the
        headers are ten seconds late.
        """
        channel, transport = connect(self.rig)
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
        for _ in range(9):
            channel.dataReceived(b"X")
            self.rig.reactor.advance(1)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"X")
        self.rig.reactor.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(trips(self.rig, "head_timeout"), 1)

    def test_a_partial_request_line_is_dropped(self):
        """With not even a request line in time there is nothing to answer: the connection is dropped."""
        channel, transport = connect(self.rig)
        channel.dataReceived(b"GET /v2/")
        self.rig.reactor.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_idle_keep_alive_connections_are_left_to_the_idle_timeout(self):
        """
        Between requests the deadline does not run: a keep-alive connection
        may sit idle (up to the idle timeout) and then send its next request.
        """
        channel, transport = connect(self.rig)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
        self.rig.reactor.advance(60)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 2)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(trips(self.rig, "head_timeout"), 0)


class ProgressTimeoutTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.rig.site.limits = ClientLimits(progress_timeout=60)
        self.data, self.digest = blob(4 * 1024 * 1024, b"progress")
        self.path = f"/v2/library/a/blobs/{self.digest}"

    def downloading(self):
        """A client of a blob whose download has begun, and the download's body."""
        client = Client(self.rig.site, self.path, "GET", {})
        body = FedBody(200, {b"Content-Length": [str(len(self.data)).encode()]})
        self.rig.upstream.answer(len(self.rig.upstream.calls) - 1, body)
        return client, body

    def test_a_client_that_takes_nothing_is_dropped_and_its_pin_released(self):
        """
        A client whose buffer stays full while bytes wait for it is aborted
        within two progress timeouts, and the blob's pin goes with it.
        """
        client, body = self.downloading()
        client.slow_down()
        body.feed(self.data)
        body.end()
        self.rig.reactor.advance(59)
        self.assertFalse(client.aborted())
        self.rig.reactor.advance(61)
        self.assertTrue(client.aborted())
        client.hang_up()
        self.assertEqual(trips(self.rig, "progress_timeout"), 1)
        self.assertEqual(self.rig.store.index.pins, {})
        self.assertEqual(self.rig.blob_file(self.digest), self.data)

    def test_a_slow_client_that_keeps_reading_is_served(self):
        """
        A client that takes one chunk every 50 seconds, many times the
        progress timeout in all, is never cut off.
        """
        client, body = self.downloading()
        body.feed(self.data)
        body.end()
        channel = self.rig.site.buildProtocol(None)
        transport = FullBuffer()
        channel.makeConnection(transport)
        channel.dataReceived(f"GET {self.path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        for _ in range(40):
            self.rig.reactor.advance(50)
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        self.assertFalse(transport.disconnected)
        self.assertEqual(transport.value().split(b"\r\n\r\n", 1)[1], self.data)
        self.assertEqual(trips(self.rig, "progress_timeout"), 0)

    def test_waiting_on_the_download_is_not_the_clients_fault(self):
        """
        A client caught up with a download that drips waits for it, however
        long between bytes: the fill's own deadlines judge upstream, not the
        client's patience.
        """
        self.rig.fills.floor = RateFloor(rate=0)  # this upstream drips on purpose: no download floor
        client, body = self.downloading()
        body.feed(self.data[:1000])
        for i in range(1000, 1013):
            self.rig.reactor.advance(10)
            body.feed(self.data[i:i + 1])
        body.feed(self.data[1013:])
        body.end()
        self.assertFalse(client.aborted())
        self.assertEqual(client.body(), self.data)
        self.assertEqual(trips(self.rig, "progress_timeout"), 0)


class ConnectionCapTests(SynchronousTestCase):
    def test_past_the_total_cap_requests_get_503_but_health_checks_answer(self):
        """
        Past ``max_connections`` a request gets 503 with Retry-After and the
        connection is closed; /healthz and /readyz still answer, so the
        kubelet sees a busy regcache, not a dead one.
        """
        rig = Rig()
        rig.site.limits = ClientLimits(max_connections=2)
        held = [connect(rig, f"10.0.0.{i}") for i in range(2)]
        channel, transport = connect(rig, "10.0.0.9")
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        raw = transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 503 "), raw[:40])
        self.assertIn(b"\r\nRetry-After: 1\r\n", raw)
        self.assertEqual(json.loads(raw.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"], "UNAVAILABLE")
        self.assertTrue(transport.disconnecting)
        for path in (b"/healthz", b"/readyz"):
            channel, transport = connect(rig, "10.0.0.9")
            channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: m\r\n\r\n")
            self.assertRegex(transport.value(), rb"^HTTP/1.1 (200|503) ")
            self.assertNotIn(b"connections", transport.value())
            self.assertTrue(transport.disconnecting, "answered, then closed: it may not stay past the cap")
        self.assertEqual(trips(rig, "max_connections"), 3)
        self.assertEqual(len(held), 2)

    def test_per_address_cap_and_the_table_empties_as_connections_close(self):
        """
        One address past ``max_per_client`` gets 429 while others are
        served; the per-address table holds only addresses with open
        connections.
        """
        rig = Rig()
        rig.site.limits = ClientLimits(max_per_client=1)
        first = connect(rig, "10.0.0.1")
        channel, transport = connect(rig, "10.0.0.1")
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 429 "))
        other, other_transport = connect(rig, "10.0.0.2")
        other.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        self.assertTrue(other_transport.value().startswith(b"HTTP/1.1 200 "))
        for c, _ in (first, (channel, transport), (other, other_transport)):
            c.connectionLost(None)
        self.assertEqual(rig.site.by_address, {})
        self.assertEqual(rig.site.connections, 0)


class ExemptTests(SynchronousTestCase):
    def test_a_trusted_proxy_has_no_per_address_cap(self):
        """An ingress (a trusted proxy) carries every client's connections: the per-address cap is not its."""
        from regcache.config import parse_networks

        rig = Rig()
        rig.site.limits = ClientLimits(max_per_client=1, exempt=parse_networks("p", ["10.9.0.0/16"]))
        connect(rig, "10.9.0.5")
        channel, transport = connect(rig, "10.9.0.5")
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        connect(rig, "10.8.0.5")
        channel, transport = connect(rig, "10.8.0.5")
        channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 429 "))


    def test_an_ipv4_mapped_peer_is_its_ipv4_address(self):
        """
        On a dual-stack listener an IPv4 ingress connects as
        ``::ffff:10.9.0.5``: it is still the trusted proxy 10.9.0.0/16
        names, and so is an IPv4 one a network written as IPv4-mapped
        (``::ffff:10.9.0.0/112``) names.
        """
        from twisted.internet.address import IPv6Address

        from regcache.config import parse_networks

        for networks, peer in ((["10.9.0.0/16"], IPv6Address("TCP", "::ffff:10.9.0.5", 40000)),
                               (["::ffff:10.9.0.0/112"], IPv4Address("TCP", "10.9.0.5", 40000))):
            with self.subTest(networks=networks):
                rig = Rig()
                rig.site.limits = ClientLimits(max_per_client=1, exempt=parse_networks("p", networks))
                for _ in range(2):
                    channel = rig.site.buildProtocol(None)
                    transport = StringTransport(peerAddress=peer)
                    channel.makeConnection(transport)
                channel.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
                self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value()[:40])


class SettingsTests(SynchronousTestCase):
    def test_the_limits_come_from_options_and_auto_fits_the_open_file_limit(self):
        """
        The options set the limits; ``auto`` leaves 64 descriptors back and
        gives each connection three; a bad count stops start-up naming it.
        """
        from regcache import config
        from regcache.service import connection_cap

        c = config.load({"client-header-timeout": "3s", "max-connections-per-client": "unlimited"}, {})
        self.assertEqual((c.client_header_timeout, c.client_progress_timeout), (3.0, 60.0))
        self.assertEqual((c.max_connections, c.max_connections_per_client), ("auto", None))
        self.assertEqual(connection_cap("auto", 1024), 320)
        self.assertEqual(connection_cap("auto", 10), 1)
        self.assertEqual(connection_cap(50, 1024), 50)
        self.assertIsNone(connection_cap(None, 1024))
        self.assertEqual(config.load({}, {"REGCACHE_MAX_CONNECTIONS": "900"}).max_connections, 900)
        for bad in ("0", "-1", "lots", "²", "9" * 40):
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(config.ConfigError, "^--max-connections: "):
                    config.load({"max-connections": bad}, {})
