# test-case-name: tests.test_tls
"""
The served TLS port's options (the floor, the ciphers, the reload that keeps
the old pair when the new one is bad) and the ``ssl:`` description, through
in-memory handshakes between pyOpenSSL connections.  The real-process side
(skopeo, containerd, SIGHUP) is tests/integration/test_tls_proc.py.
"""

import shutil
import tempfile

import pytest
from OpenSSL import SSL
from twisted.internet.defer import succeed
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from regcache.config import ConfigError
from regcache.listener import listen_endpoint
from regcache.tls import ServedTLS, split_description
from tests.certs import CA, serial_of


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    """Shuttle bytes between two memory-BIO connections until both finish (or one raises)."""
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        done = 0
        for me, peer in ((client, server), (server, client)):
            try:
                me.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            try:
                peer.bio_write(me.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == 2:
            return
    raise AssertionError("the handshake did not finish")


def _client(ca_path: str, maximum=None, ciphers: bytes = None) -> SSL.Connection:
    """A client that verifies against the CA, offering protocols up to ``maximum`` (TLS 1.0 too) or ``ciphers``."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.load_verify_locations(ca_path)
    context.set_verify(SSL.VERIFY_PEER, lambda *a: a[-1])
    if maximum is not None:
        context.set_min_proto_version(SSL.TLS1_VERSION)
        context.set_max_proto_version(maximum)
        if maximum < SSL.TLS1_2_VERSION:
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    if ciphers is not None:
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(ciphers)
    return SSL.Connection(context, None)


def _immediately(f, *args):
    return succeed(f(*args))


def _scratch(case) -> str:
    """A directory outside the worktree for one test's keys, removed after it."""
    path = tempfile.mkdtemp(prefix="regcache-tls-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


class ServedTLSTests(SynchronousTestCase):
    def setUp(self):
        self.ca = CA(_scratch(self))
        self.key, self.cert = self.ca.issue("first")
        self.tls = ServedTLS(self.key, self.cert)

    def served_serial(self) -> int:
        client = _client(self.ca.path)
        _handshake(self.tls.serverConnectionForTLS(None), client)
        return client.get_peer_certificate().get_serial_number()

    def test_tls12_and_13_clients_are_served(self):
        """A client that verifies against the CA completes a handshake, at TLS 1.3 and at TLS 1.2."""
        self.assertEqual(self.served_serial(), serial_of(self.cert))
        client = _client(self.ca.path, maximum=SSL.TLS1_2_VERSION)
        _handshake(self.tls.serverConnectionForTLS(None), client)
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")

    def test_tls11_client_is_refused(self):
        """A client that offers nothing newer than TLS 1.1 gets no session, even with every cipher allowed."""
        with pytest.raises(SSL.Error):
            _handshake(self.tls.serverConnectionForTLS(None), _client(self.ca.path, maximum=SSL.TLS1_1_VERSION))

    def test_cbc_sha1_suites_are_refused(self):
        """A TLS 1.2 client that offers only CBC suites with SHA-1 MACs gets no session."""
        with pytest.raises(SSL.Error):
            _handshake(self.tls.serverConnectionForTLS(None),
                       _client(self.ca.path, ciphers=b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA"))

    def test_reload_serves_the_new_certificate_to_new_connections(self):
        """After a reload, a new handshake sees the new certificate."""
        key, cert = self.ca.issue("second")
        shutil.copy(key, self.key)
        shutil.copy(cert, self.cert)
        self.successResultOf(self.tls.reloader(_immediately)())
        self.assertEqual(self.served_serial(), serial_of(cert))

    def test_reload_of_a_bad_pair_keeps_the_old_one(self):
        """A key that does not match the certificate fails the reload with the option named; the old pair is served."""
        other_key, _ = self.ca.issue("other")
        before = serial_of(self.cert)
        _, new_cert = self.ca.issue("second")
        shutil.copy(other_key, self.key)
        shutil.copy(new_cert, self.cert)
        failure = self.failureResultOf(self.tls.reloader(_immediately)(), ConfigError)
        self.assertIn("--listen", str(failure.value))
        self.assertEqual(self.served_serial(), before)

    def test_reload_of_a_missing_file_keeps_the_old_one(self):
        """A key file that has gone fails the reload naming the file; the old pair is served."""
        before = serial_of(self.cert)
        shutil.move(self.key, self.key + ".gone")
        failure = self.failureResultOf(self.tls.reloader(_immediately)(), ConfigError)
        self.assertIn(self.key, str(failure.value))
        self.assertEqual(self.served_serial(), before)


class DescriptionTests(SynchronousTestCase):
    def test_escapes(self):
        """Twisted's escapes are honoured: ``\\:`` inside a value is a colon, not a separator."""
        self.assertEqual(split_description(r"ssl:5443:privateKey=/a\:b.pem:interface=\:\:1"),
                         (["ssl", "5443"], {"privateKey": "/a:b.pem", "interface": "::1"}))

    def test_ssl_description_gives_the_reloadable_endpoint(self):
        """``ssl:PORT:privateKey=…:certKey=…`` is served by regcache's own context, returned for SIGHUP."""
        ca = CA(_scratch(self))
        key, cert = ca.issue("server")
        endpoint, tls = listen_endpoint(MemoryReactorClock(), f"ssl:5443:privateKey={key}:certKey={cert}")
        self.assertIsInstance(endpoint, SSL4ServerEndpoint)
        self.assertIsInstance(tls, ServedTLS)
        self.assertEqual((tls.key_path, tls.cert_path), (key, cert))

    def test_sslmethod_is_refused(self):
        """``sslmethod`` would undo the TLS 1.2 floor, so it is an error naming the option."""
        ca = CA(_scratch(self))
        key, cert = ca.issue("server")
        with pytest.raises(ConfigError, match="--listen: .*unknown parameter 'sslmethod'"):
            listen_endpoint(MemoryReactorClock(), f"ssl:5443:privateKey={key}:certKey={cert}:sslmethod=TLSv1_METHOD")

    def test_tcp_description_has_no_tls(self):
        """A plain TCP description is Twisted's endpoint, with nothing for SIGHUP to reload."""
        self.assertIsNone(listen_endpoint(MemoryReactorClock(), "tcp:5000")[1])
