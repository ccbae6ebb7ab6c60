# test-case-name: tests.test_listener
"""
The listening port: a process that cannot listen says so in one line naming
the endpoint and ends, whether the endpoint fails at once (all of Twisted's)
or later; "serving" is logged only once it listens.  The real-process side
is in tests/integration/test_settings_proc.py.
"""

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from regcache.config import ConfigError
from regcache.listener import BACKLOG, Listener, listen_endpoint

IN_USE = CannotListenError("127.0.0.1", 5000, OSError(98, "Address already in use"))


class Endpoint:
    """An endpoint whose listen() answers what the test gives it."""

    def __init__(self, result):
        self.result = result

    def listen(self, factory):
        return self.result


class Port:
    def getHost(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 5000)

    def stopListening(self):
        return None


class ListenerTests(SynchronousTestCase):
    def setUp(self):
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.reactor = MemoryReactorClock()

    def listener(self, result):
        return Listener(Endpoint(result), "tcp:5000", object(), self.reactor, served="caching U in S")

    def messages(self, level):
        return [formatEvent(e) for e in self.events if e["log_level"] == level
                and e.get("log_namespace", "").startswith("regcache")]

    def test_listen_failure_while_starting_ends_twistd(self):
        """A port that fails at once logs one critical line naming the endpoint and raises SystemExit(1)."""
        with pytest.raises(SystemExit) as e:
            self.listener(fail(IN_USE)).privilegedStartService()
        self.assertEqual(e.value.code, 1)
        self.assertEqual(self.messages(LogLevel.critical),
                         ["regcache: --listen: cannot listen on 'tcp:5000': Address already in use"])
        self.assertEqual(self.messages(LogLevel.info), [])

    def test_listen_failure_later_stops_the_reactor(self):
        """An endpoint that fails after start-up logs the same line and stops the reactor."""
        later = Deferred()
        self.listener(later).privilegedStartService()
        self.assertFalse(self.reactor.hasStopped)
        later.errback(IN_USE)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(self.messages(LogLevel.critical),
                         ["regcache: --listen: cannot listen on 'tcp:5000': Address already in use"])

    def test_serving_is_logged_once_listening(self):
        """The "serving" line comes when the port listens, with its address, and not before."""
        later = Deferred()
        listener = self.listener(later)
        listener.startService()
        self.assertEqual(self.messages(LogLevel.info), [])
        later.callback(Port())
        self.assertEqual(self.messages(LogLevel.info),
                         ["regcache serving tcp:5000 on 127.0.0.1:5000, caching U in S"])
        listener.stopService()

    def test_stop_before_listening_cancels_quietly(self):
        """Stopping while the endpoint has not answered cancels the listen, with nothing logged as critical."""
        later = Deferred()
        listener = self.listener(later)
        listener.startService()
        listener.stopService()
        self.assertEqual(self.messages(LogLevel.critical), [])


@pytest.mark.parametrize("description,message", [
    ("tcp:notaport", "--listen: cannot use 'tcp:notaport': 'notaport' is not a number"),
    ("tcp:5000:backlog=many", "--listen: cannot use 'tcp:5000:backlog=many': 'many' is not a number"),
    ("tcp:5000:colour=blue", "--listen: cannot use 'tcp:5000:colour=blue': unknown parameter 'colour'"),
    ("carrier-pigeon:5000", "--listen: cannot use 'carrier-pigeon:5000': Unknown endpoint type: 'carrier-pigeon'"),
    ("ssl:5443:privateKey=/nonexistent.pem",
     "--listen: cannot use 'ssl:5443:privateKey=/nonexistent.pem': cannot read /nonexistent.pem: "
     "No such file or directory"),
])
def test_bad_endpoints_are_listens_fault(description, message):
    """Every way of building the endpoint failing is a ConfigError naming --listen, in words."""
    with pytest.raises(ConfigError) as e:
        listen_endpoint(MemoryReactorClock(), description)
    assert str(e.value) == message


def test_a_key_that_is_not_pem_is_listens_fault(tmp_path):
    """A TLS key file that OpenSSL cannot read is --listen's fault, said in words, not OpenSSL's tuple."""
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    with pytest.raises(ConfigError) as e:
        listen_endpoint(MemoryReactorClock(), f"ssl:5443:privateKey={key}")
    assert str(e.value) == (f"--listen: cannot use 'ssl:5443:privateKey={key}': "
                            "the TLS key or certificate is not valid PEM, or they do not match")


@pytest.mark.parametrize("description, backlog", [
    ("tcp:0", BACKLOG),
    ("tcp:0:interface=127.0.0.1", BACKLOG),
    ("tcp:0:backlog=10", 10),
])
def test_the_accept_queue_takes_a_burst_of_connects(description, backlog):
    """
    A TCP port asks for an accept queue that a burst of clients fits in:
    with Twisted's default of 50, 100 of 1,000 clients connecting at once
    were dropped by the kernel and hung (bench/README.md).  A backlog the
    operator sets is kept.
    """
    reactor = MemoryReactorClock()
    endpoint, _ = listen_endpoint(reactor, description)
    endpoint.listen(Factory())
    assert [server[2] for server in reactor.tcpServers] == [backlog]
