"""regcache.peers: the signature a replica's forwarded request carries, and the default advertised URL."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from regcache.peers import MAX_SKEW, PeerAuth, default_advertise, peer_key
from regcache.reference import Digest

DIGEST = str(Digest.of(b"a blob"))


class PeerAuthTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.auth = PeerAuth(peer_key("the bucket's secret"), self.clock)

    def test_a_signature_checks_for_its_digest(self):
        """A replica with the same bucket secret accepts what another signed for that digest."""
        other = PeerAuth(peer_key("the bucket's secret"), self.clock)
        self.assertIsNone(other.problem(self.auth.sign(DIGEST).encode(), DIGEST))

    def test_a_signature_is_for_one_digest_only(self):
        """A signature for one blob does not open another."""
        other = str(Digest.of(b"another blob"))
        self.assertIn("does not match", self.auth.problem(self.auth.sign(DIGEST).encode(), other))

    def test_another_secret_signs_nothing_this_replica_accepts(self):
        """Without the bucket's secret key no valid signature can be made."""
        stranger = PeerAuth(peer_key("some other secret"), self.clock)
        self.assertIn("does not match", self.auth.problem(stranger.sign(DIGEST).encode(), DIGEST))

    def test_an_old_signature_is_refused(self):
        """A signature replayed after MAX_SKEW seconds is refused."""
        signed = self.auth.sign(DIGEST).encode()
        self.clock.advance(MAX_SKEW + 1)
        self.assertIn("too old", self.auth.problem(signed, DIGEST))

    def test_a_missing_or_malformed_header_is_refused(self):
        """No header, or one that is not timestamp:hex, is refused before any MAC is computed."""
        self.assertIn("missing", self.auth.problem(None, DIGEST))
        for value in (b"", b"abc", b"1:xyz", b"1700000000:" + b"0" * 63, "1700000000:é".encode()):
            self.assertIn("malformed", self.auth.problem(value, DIGEST))

    def test_the_key_is_derived_not_the_secret_itself(self):
        """The key that signs is not the bucket's secret key, which never goes into a MAC."""
        self.assertNotEqual(peer_key("s"), b"s")
        self.assertEqual(len(peer_key("s")), 32)


class AdvertiseTests(SynchronousTestCase):
    def test_the_listening_port_and_scheme_are_advertised(self):
        """Without --advertise, peers are told the listening port, over https for an ssl: endpoint."""
        self.assertRegex(default_advertise("tcp:5000:interface=0.0.0.0"), r"^http://[0-9.]+:5000$")
        self.assertRegex(default_advertise("tcp:port=5001"), r"^http://[0-9.]+:5001$")
        self.assertRegex(default_advertise("ssl:5443:privateKey=k.pem"), r"^https://[0-9.]+:5443$")

    def test_an_endpoint_without_a_port_advertises_nothing(self):
        """A unix socket has no address peers can reach: --advertise must say it."""
        self.assertIsNone(default_advertise("unix:/run/regcache.sock"))

    def test_a_host_whose_name_does_not_resolve_advertises_nothing(self):
        """No address for this host's name: nothing is guessed, --advertise must say it."""
        import socket

        def unresolvable(name):
            raise socket.gaierror("no such host")

        self.patch(socket, "gethostbyname", unresolvable)
        self.assertIsNone(default_advertise("tcp:5000"))
