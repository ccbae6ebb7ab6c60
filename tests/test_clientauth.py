# test-case-name: tests.test_clientauth
"""
Client authentication through the real routes on a MemoryReactorClock: every
outcome of a login, trusted networks and proxies, the slow-down of an
address that keeps failing, the bounds of every table keyed by clients, the
htpasswd file and its reloads, and ``anonymous: cached-only`` against the
in-memory fake Hub, which counts every request regcache sends it.
"""

import base64
import json
import os
import tempfile

import bcrypt
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from regcache import clientauth
from regcache.clientauth import Gate, Throttle, client_address, read_users
from regcache.config import AuthSettings, ConfigError, load, parse_networks
from regcache.metrics import Metrics
from tests.support import HubRig, Rig, inline

ALL = ", ".join(["application/vnd.docker.distribution.manifest.v2+json",
                 "application/vnd.oci.image.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.list.v2+json",
                 "application/vnd.oci.image.index.v1+json"])
PASSWORD = "correct horse"


def htpasswd(users, path=None) -> str:
    """An htpasswd file of bcrypt entries (cost 4: quick to check) for {user: password}."""
    path = path or os.path.join(tempfile.mkdtemp(prefix="regcache-htpasswd-"), "htpasswd")
    with open(path, "w") as f:
        for user, password in users.items():
            f.write(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n")
    return path


def basic(user, password) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def settings(**kw) -> AuthSettings:
    kw.setdefault("htpasswd", htpasswd({"ci": PASSWORD, "alice": "wonderland"}))
    for key in ("trusted_networks", "trusted_proxies"):
        kw[key] = parse_networks(key, kw.get(key, ()))
    return AuthSettings(**kw)


def code(client) -> str:
    return json.loads(client.body())["errors"][0]["code"]


class CountingRun:
    """A thread runner that runs inline, recording what it ran, or holds each call until told."""

    def __init__(self, hold=False):
        self.hold = hold
        self.ran = []
        self.held = []

    def __call__(self, f, *args):
        self.ran.append(f.__name__)
        if self.hold:
            d = Deferred()
            self.held.append((d, f, args))
            return d
        return inline(f, *args)

    def checks(self) -> int:
        return self.ran.count("_verify")

    def release(self):
        for d, f, args in self.held:
            d.callback(f(*args))
        self.held = []


class OffTests(SynchronousTestCase):
    def test_off_by_default(self):
        """Without an auth section or option there is no authentication: no credentials, no 401."""
        self.assertIsNone(load({}, {}).auth)
        self.assertEqual(Rig().client("/v2/").status(), 200)


class LoginTests(SynchronousTestCase):
    def setUp(self):
        self.run = CountingRun()
        self.rig = Rig(auth=settings(), auth_run=self.run)

    def failures(self, reason) -> float:
        return self.rig.metrics.client_auth_failures.labels(reason)._value.get()

    def test_no_credentials_are_challenged_on_every_registry_route(self):
        """
        Without credentials every /v2/ route answers 401 UNAUTHORIZED with
        the Basic challenge, before the path is even looked at.
        """
        for path in ("/v2/", "/v2", "/v2/library/a/manifests/1", "/v2/library/a/blobs/sha256:" + "a" * 64,
                     "/v2/library/a/tags/list", "/v2/_catalog", "/v2/BAD//name/manifests/x"):
            c = self.rig.client(path)
            self.assertEqual((c.status(), code(c)), (401, "UNAUTHORIZED"), path)
            self.assertEqual(c.header("WWW-Authenticate"), 'Basic realm="regcache"', path)
        self.assertEqual(self.run.checks(), 0)

    def test_probes_and_metrics_stay_open(self):
        """/healthz, /readyz and /metrics need no credentials."""
        from regcache.expiry import Expiry

        Expiry(self.rig.store, None, self.rig.reactor).startService()
        for path in ("/", "/healthz", "/readyz", "/metrics"):
            self.assertEqual(self.rig.client(path).status(), 200, path)

    def test_good_password_is_let_in_and_checked_once(self):
        """A valid login answers 200; the next fifty within a minute cost no more bcrypt."""
        for _ in range(51):
            self.assertEqual(self.rig.client("/v2/", headers=basic("ci", PASSWORD)).status(), 200)
        self.assertEqual(self.run.checks(), 1)

    def test_a_passed_check_expires(self):
        """After a minute the same credentials are checked again."""
        self.rig.client("/v2/", headers=basic("ci", PASSWORD))
        self.rig.reactor.advance(clientauth.CACHE_SECONDS + 1)
        self.assertEqual(self.rig.client("/v2/", headers=basic("ci", PASSWORD)).status(), 200)
        self.assertEqual(self.run.checks(), 2)

    def test_bad_password_is_refused_counted_and_logged_without_it(self):
        """
        A wrong password answers 401 with the challenge, counts as
        bad_password, and is logged with the user and address, never the
        password (nor does the password reach the metrics).
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        c = self.rig.client("/v2/", headers=basic("ci", "hunter2-guess"), peer="198.51.100.7")
        self.assertEqual((c.status(), code(c)), (401, "UNAUTHORIZED"))
        self.assertEqual(c.header("WWW-Authenticate"), 'Basic realm="regcache"')
        self.assertEqual(self.failures("bad_password"), 1)
        failed = [e for e in events if e.get("reason") == "bad_password"]
        self.assertEqual([(e["user"], e["address"]) for e in failed], [("ci", "198.51.100.7")])
        from twisted.logger import formatEvent

        for e in events:
            self.assertNotIn("hunter2-guess", formatEvent(e) + repr(e))
        metrics = self.rig.client("/metrics").body().decode()
        self.assertIn('regcache_client_auth_failures_total{reason="bad_password"} 1.0', metrics)
        self.assertNotIn("hunter2", metrics)
        self.assertNotIn('"ci"', metrics)

    def test_unknown_user_is_refused_after_a_check(self):
        """An unknown user is refused like a wrong password, after a bcrypt of its own (no timing tell)."""
        c = self.rig.client("/v2/", headers=basic("mallory", PASSWORD))
        self.assertEqual(c.status(), 401)
        self.assertEqual(self.failures("unknown_user"), 1)
        self.assertEqual(self.run.checks(), 1)

    def test_malformed_basic_is_refused(self):
        """A Basic header that is not base64 of user:password is a 401 and counts as malformed."""
        for value in ("Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(), "Basic "):
            c = self.rig.client("/v2/", headers={"Authorization": value})
            self.assertEqual(c.status(), 401, value)
        self.assertEqual(self.failures("malformed"), 3)
        self.assertEqual(self.run.checks(), 0)

    def test_other_schemes_are_asked_for_basic(self):
        """A Bearer header (meant for some other registry) is no credentials: the client is challenged."""
        c = self.rig.client("/v2/", headers={"Authorization": "Bearer abc"})
        self.assertEqual(c.status(), 401)
        self.assertEqual(c.header("WWW-Authenticate"), 'Basic realm="regcache"')
        self.assertEqual(self.failures("malformed"), 0)

    def test_long_passwords_are_checked_as_htpasswd_hashed_them(self):
        """A password past bcrypt's 72 bytes is checked on its first 72, as htpasswd -B hashed it, never a 500."""
        import subprocess

        long = "x" * 100
        path = os.path.join(tempfile.mkdtemp(prefix="regcache-htpasswd-"), "htpasswd")
        subprocess.run(["htpasswd", "-cbB", "-C", "4", path, "ci", long], check=True, capture_output=True)
        rig = Rig(auth=settings(htpasswd=path))
        self.assertEqual(rig.client("/v2/", headers=basic("ci", long)).status(), 200)
        self.assertEqual(rig.client("/v2/", headers=basic("ci", "y" * 100)).status(), 401)


class ConcurrencyTests(SynchronousTestCase):
    def test_concurrent_logins_share_one_check(self):
        """Ten requests with the same credentials arriving during its check cost one bcrypt between them."""
        run = CountingRun(hold=True)
        rig = Rig(auth=settings(), auth_run=run)
        clients = [rig.client("/v2/", headers=basic("ci", PASSWORD)) for _ in range(10)]
        self.assertEqual(run.checks(), 1)
        run.release()
        self.assertEqual([c.status() for c in clients], [200] * 10)

    def test_checks_are_bounded(self):
        """
        Past MAX_CHECKS checks queued at once, a further login is answered
        503 with Retry-After, not queued; a login joining a queued check
        still joins it.
        """
        run = CountingRun(hold=True)
        rig = Rig(auth=settings(), auth_run=run)
        waiting = [rig.client("/v2/", headers=basic("ci", f"guess{i}"), peer=f"10.0.{i}.1")
                   for i in range(clientauth.MAX_CHECKS)]
        over = rig.client("/v2/", headers=basic("ci", "one too many"), peer="10.1.0.1")
        self.assertEqual((over.status(), code(over)), (503, "UNAVAILABLE"))
        self.assertEqual(over.header("Retry-After"), "1")
        joined = rig.client("/v2/", headers=basic("ci", "guess0"), peer="10.2.0.1")
        self.assertEqual(run.checks(), clientauth.MAX_CHECKS)
        self.assertEqual(rig.metrics.client_auth_failures.labels("busy")._value.get(), 1)
        run.release()
        self.assertEqual({c.status() for c in waiting + [joined]}, {401})
        after = rig.client("/v2/", headers=basic("ci", PASSWORD), peer="10.3.0.1")
        run.release()
        self.assertEqual(after.status(), 200)


class TrustTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig(auth=settings(trusted_networks=["192.0.2.0/24", "2001:db8::/32"],
                                     trusted_proxies=["10.9.9.9", "10.9.9.10"]))

    def test_trusted_networks_need_no_credentials(self):
        """A client on a trusted network (IPv4, IPv6, IPv4-mapped) is let in without credentials; others are not."""
        self.assertEqual(self.rig.client("/v2/", peer="192.0.2.44").status(), 200)
        self.assertEqual(self.rig.client("/v2/", peer="2001:db8::5").status(), 200)
        self.assertEqual(self.rig.client("/v2/", peer="::ffff:192.0.2.44").status(), 200)
        self.assertEqual(self.rig.client("/v2/", peer="198.51.100.1").status(), 401)

    def test_ipv4_mapped_addresses_and_networks_are_ipv4(self):
        """
        An IPv4 client seen as IPv4-mapped IPv6 (a dual-stack listener) is
        its IPv4 address for every check, and a network written as
        IPv4-mapped names those IPv4 addresses: a mapped trusted proxy's
        X-Forwarded-For is believed, and ``::ffff:198.51.100.0/120`` trusts
        198.51.100.7 however it connects.
        """
        c = self.rig.client("/v2/", headers={"X-Forwarded-For": "192.0.2.44"}, peer="::ffff:10.9.9.9")
        self.assertEqual(c.status(), 200)
        c = self.rig.client("/v2/", headers={"X-Forwarded-For": "::ffff:192.0.2.44, ::ffff:10.9.9.10"},
                            peer="10.9.9.9")
        self.assertEqual(c.status(), 200)
        rig = Rig(auth=settings(trusted_networks=["::ffff:198.51.100.0/120"]))
        for peer in ("198.51.100.7", "::ffff:198.51.100.7"):
            self.assertEqual(rig.client("/v2/", peer=peer).status(), 200, peer)
        self.assertEqual(rig.client("/v2/", peer="198.51.101.7").status(), 401)

    def test_forwarded_for_is_believed_from_a_trusted_proxy(self):
        """Behind a trusted proxy the client is the right-most X-Forwarded-For address that is no proxy."""
        c = self.rig.client("/v2/", headers={"X-Forwarded-For": "192.0.2.44"}, peer="10.9.9.9")
        self.assertEqual(c.status(), 200)
        c = self.rig.client("/v2/", headers={"X-Forwarded-For": "192.0.2.44, 10.9.9.10"}, peer="10.9.9.9")
        self.assertEqual(c.status(), 200)

    def test_forwarded_for_is_ignored_from_anyone_else(self):
        """From a peer that is no trusted proxy, X-Forwarded-For naming a trusted address changes nothing."""
        c = self.rig.client("/v2/", headers={"X-Forwarded-For": "192.0.2.44"}, peer="198.51.100.1")
        self.assertEqual(c.status(), 401)

    def test_a_client_cannot_prepend_a_trusted_address(self):
        """What a client wrote left of the address its proxy added proves nothing."""
        c = self.rig.client("/v2/", headers={"X-Forwarded-For": ["192.0.2.44", "198.51.100.1"]}, peer="10.9.9.9")
        self.assertEqual(c.status(), 401)
        c = self.rig.client("/v2/", headers={"X-Forwarded-For": "192.0.2.44, 198.51.100.1"}, peer="10.9.9.9")
        self.assertEqual(c.status(), 401)

    def test_client_address(self):
        """The walk: proxies skipped from the right, garbage stops at the proxy that passed it, no header is the peer."""
        proxies = parse_networks("p", ["10.9.0.0/16"])
        self.assertEqual(str(client_address("10.9.0.1", [b"203.0.113.9, 10.9.0.2"], proxies)), "203.0.113.9")
        self.assertEqual(str(client_address("10.9.0.1", [b"203.0.113.9, not-an-ip"], proxies)), "10.9.0.1")
        self.assertEqual(str(client_address("10.9.0.1", [b"10.9.0.3, 10.9.0.2"], proxies)), "10.9.0.3")
        self.assertEqual(str(client_address("10.9.0.1", [], proxies)), "10.9.0.1")
        self.assertEqual(str(client_address("203.0.113.1", [b"10.9.0.3"], proxies)), "203.0.113.1")
        self.assertIsNone(client_address(None, [b"203.0.113.9"], proxies))


class ThrottleTests(SynchronousTestCase):
    def setUp(self):
        self.run = CountingRun()
        self.rig = Rig(auth=settings(), auth_run=self.run)

    def fail(self, n, peer="198.51.100.7"):
        for _ in range(n):
            self.assertEqual(self.rig.client("/v2/", headers=basic("ci", "wrong"), peer=peer).status(), 401)

    def test_an_address_that_keeps_failing_waits(self):
        """
        After five failures in a row an address is answered 429 with
        Retry-After, without a check, even with the right password; other
        addresses are not; once the wait is over it is checked again.
        """
        self.fail(clientauth.MAX_FAILURES)
        checks = self.run.checks()
        c = self.rig.client("/v2/", headers=basic("ci", PASSWORD), peer="198.51.100.7")
        self.assertEqual((c.status(), code(c)), (429, "TOOMANYREQUESTS"))
        self.assertEqual(c.header("Retry-After"), str(clientauth.FIRST_WAIT + 1))
        self.assertEqual(self.run.checks(), checks)
        self.assertEqual(self.rig.client("/v2/", headers=basic("ci", PASSWORD), peer="198.51.100.8").status(), 200)
        self.rig.reactor.advance(clientauth.FIRST_WAIT)
        self.assertEqual(self.rig.client("/v2/", headers=basic("ci", PASSWORD), peer="198.51.100.7").status(), 200)

    def test_the_wait_grows_and_is_forgotten_after_a_quiet_minute(self):
        """Each further failure doubles the wait (to a cap); a quiet window after the wait forgets the address."""
        throttle = Throttle(Clock())
        for _ in range(clientauth.MAX_FAILURES):
            throttle.failed("a")
        waits = [throttle.wait("a")]
        for _ in range(10):
            throttle.clock.advance(throttle.wait("a"))
            throttle.failed("a")
            waits.append(throttle.wait("a"))
        self.assertEqual(waits[:4], [5, 10, 20, 40])
        self.assertEqual(max(waits), clientauth.MAX_WAIT)
        throttle.clock.advance(clientauth.MAX_WAIT + clientauth.FAILURE_WINDOW + 1)
        self.assertEqual(throttle.wait("a"), 0)
        throttle.failed("a")
        self.assertEqual(throttle.wait("a"), 0)

    def test_anonymous_requests_from_a_waiting_address_are_only_challenged(self):
        """A waiting address without credentials gets the plain challenge: it tries no password."""
        self.fail(clientauth.MAX_FAILURES)
        self.assertEqual(self.rig.client("/v2/", peer="198.51.100.7").status(), 401)


class BoundTests(SynchronousTestCase):
    def test_a_burst_of_guesses_gets_no_more_checks_than_failures_left(self):
        """
        Guesses sent from one address all at once are checked only as many
        at a time as the failures the address has left before it waits
        (the rest are 429 at once); a request with credentials already
        being checked joins that check; once they fail, one at a time.
        """
        run = CountingRun(hold=True)
        rig = Rig(auth=settings(), auth_run=run)
        peer = "198.51.100.7"
        burst = [rig.client("/v2/", headers=basic("ci", f"guess{i}"), peer=peer)
                 for i in range(clientauth.MAX_FAILURES + 3)]
        joined = rig.client("/v2/", headers=basic("ci", "guess0"), peer=peer)
        self.assertEqual(run.checks(), clientauth.MAX_FAILURES)
        self.assertEqual([c.status() for c in burst[clientauth.MAX_FAILURES:]], [429] * 3)
        run.release()
        self.assertEqual({c.status() for c in burst[:clientauth.MAX_FAILURES] + [joined]}, {401})
        rig.reactor.advance(rig.gate.throttle.wait(peer))
        again = [rig.client("/v2/", headers=basic("ci", f"again{i}"), peer=peer) for i in range(2)]
        self.assertEqual((run.checks(), again[1].status()), (clientauth.MAX_FAILURES + 1, 429))
        run.release()
        self.assertEqual(again[0].status(), 401)

    def test_an_ipv6_client_is_its_whole_64(self):
        """Failures from addresses of one IPv6 /64 add up; another /64 and IPv4 addresses stay apart."""
        throttle = Throttle(Clock())
        for i in range(clientauth.MAX_FAILURES):
            throttle.failed(f"2001:db8:0:1::{i + 1:x}")
        self.assertEqual(throttle.wait("2001:db8:0:1:ffff::9"), clientauth.FIRST_WAIT)
        self.assertEqual(throttle.wait("2001:db8:0:2::1"), 0)
        for i in range(clientauth.MAX_FAILURES):
            throttle.failed(f"192.0.2.{i + 1}")
        self.assertEqual(throttle.wait("192.0.2.1"), 0)
        self.assertEqual(len(throttle), 1 + clientauth.MAX_FAILURES)

    def test_the_failure_table_is_bounded(self):
        """The table of failing addresses keeps at most its size, forgetting the least recently failed."""
        throttle = Throttle(Clock(), size=3)
        for i in range(clientauth.MAX_FAILURES):
            throttle.failed("first")
        for i in range(10):
            throttle.failed(f"other{i}")
        self.assertEqual(len(throttle), 3)
        self.assertEqual(throttle.wait("first"), 0)

    def test_the_passed_checks_are_bounded(self):
        """Past CACHE_ENTRIES remembered logins the oldest is forgotten, and checked again."""
        self.patch(clientauth, "CACHE_ENTRIES", 2)
        run = CountingRun()
        users = {f"u{i}": f"p{i}" for i in range(3)}
        rig = Rig(auth=settings(htpasswd=htpasswd(users)), auth_run=run)
        for user in ("u0", "u1", "u0", "u1"):
            rig.client("/v2/", headers=basic(user, users[user]))
        self.assertEqual(run.checks(), 2)
        rig.client("/v2/", headers=basic("u2", "p2"))
        rig.client("/v2/", headers=basic("u1", "p1"))
        self.assertEqual(run.checks(), 3)
        rig.client("/v2/", headers=basic("u0", "p0"))
        self.assertEqual(run.checks(), 4)


class IdentityTests(SynchronousTestCase):
    def identify(self, gate, headers=None, peer="198.51.100.1"):
        from twisted.internet.address import IPv4Address
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", peer, 1234)
        for k, v in (headers or {}).items():
            request.requestHeaders.addRawHeader(k.encode(), v.encode())
        return self.successResultOf(Deferred.fromCoroutine(gate.identify(request)))

    def test_identities(self):
        """
        A login carries its user and groups; a trusted client is trusted and
        may fetch; in cached-only mode an anonymous stranger may not fetch,
        and with allow it may.
        """
        gate = Gate(settings(trusted_networks=["10.0.0.0/8"], groups={"robots": ("ci",), "people": ("alice",)},
                             anonymous="cached-only"), Clock(), inline, Metrics())
        ci = self.identify(gate, basic("ci", PASSWORD))
        self.assertEqual((ci.user, ci.groups, ci.may_fetch, ci.address), ("ci", {"robots"}, True, "198.51.100.1"))
        node = self.identify(gate, peer="10.1.2.3")
        self.assertEqual((node.user, node.trusted, node.may_fetch), (None, True, True))
        stranger = self.identify(gate)
        self.assertEqual((stranger.user, stranger.trusted, stranger.may_fetch), (None, False, False))
        gate = Gate(settings(anonymous="allow"), Clock(), inline, Metrics())
        self.assertTrue(self.identify(gate).may_fetch)


class AccessLogTests(SynchronousTestCase):
    def test_each_request_carries_its_identity_for_the_access_log(self):
        """The routes leave the request's Identity on it, where the access log can name the user."""
        rig = Rig(auth=settings())
        seen = []
        rig.site.log = lambda request: seen.append(getattr(request, "identity", None))
        rig.client("/v2/", headers=basic("ci", PASSWORD))
        rig.client("/v2/_catalog", headers=basic("alice", "wonderland"))
        self.assertEqual([i.user for i in seen], ["ci", "alice"])

    def test_nothing_to_reload_without_a_file(self):
        """reload() with no htpasswd file (trusted networks only, or auth off) reads nothing and says so."""
        for auth in (AuthSettings(trusted_networks=parse_networks("n", ["10.0.0.0/8"])), None):
            self.assertFalse(self.successResultOf(Gate(auth, Clock(), inline, Metrics()).reload()))


class HtpasswdTests(SynchronousTestCase):
    def write(self, text) -> str:
        path = os.path.join(tempfile.mkdtemp(prefix="regcache-htpasswd-"), "htpasswd")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_only_bcrypt_entries_load(self):
        """An apr1, SHA-1 or plain entry is refused at load, naming the file, the line and htpasswd -B."""
        good = bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()
        for entry in ("$apr1$it6gSADG$b/hL8xsFWye917y4Cfrnx/", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "plain"):
            path = self.write(f"# users\nok:{good}\n\nbad:{entry}\n")
            with self.assertRaises(ConfigError) as e:
                read_users(path)
            self.assertEqual(str(e.exception), f"htpasswd {path}:4: user 'bad': not a bcrypt entry (regcache checks "
                                               "bcrypt only: create the entry with htpasswd -B)")

    def test_malformed_and_duplicate_lines_are_refused(self):
        """A line with no colon, or a user listed twice, is refused with its line."""
        good = bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()
        with self.assertRaisesRegex(ConfigError, r":1: not a user:hash line"):
            read_users(self.write("just-a-name\n"))
        with self.assertRaisesRegex(ConfigError, r":2: user 'a' is listed twice"):
            read_users(self.write(f"a:{good}\na:{good}\n"))
        with self.assertRaisesRegex(ConfigError, r"cannot read '/nonexistent/htpasswd'"):
            read_users("/nonexistent/htpasswd")

    def test_a_bad_file_stops_start_up(self):
        """A Gate over a bad htpasswd file is never built: start-up fails with its ConfigError."""
        with self.assertRaises(ConfigError):
            Gate(settings(htpasswd=self.write("x:plain\n")), Clock(), inline, Metrics())

    def test_reload_takes_the_new_users_and_forgets_passed_checks(self):
        """After reload() the new file is in force: a changed password is refused at once, the new one let in."""
        path = htpasswd({"ci": PASSWORD})
        rig = Rig(auth=settings(htpasswd=path))
        self.assertEqual(rig.client("/v2/", headers=basic("ci", PASSWORD)).status(), 200)
        htpasswd({"ci": "rotated"}, path)
        self.assertTrue(self.successResultOf(rig.gate.reload()))
        self.assertEqual(rig.client("/v2/", headers=basic("ci", PASSWORD)).status(), 401)
        self.assertEqual(rig.client("/v2/", headers=basic("ci", "rotated"), peer="10.0.0.2").status(), 200)

    def test_a_bad_reload_keeps_the_users(self):
        """A reload of a broken file fails with why, and the users in force stay."""
        path = htpasswd({"ci": PASSWORD})
        rig = Rig(auth=settings(htpasswd=path))
        with open(path, "w") as f:
            f.write("ci:$apr1$it6gSADG$b/hL8xsFWye917y4Cfrnx/\n")
        self.failureResultOf(rig.gate.reload(), ConfigError)
        self.assertEqual(rig.client("/v2/", headers=basic("ci", PASSWORD)).status(), 200)

    def test_the_file_is_reloaded_when_it_changes(self):
        """check_file reloads only a changed file, and a broken change is logged and kept out."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        path = htpasswd({"ci": PASSWORD})
        run = CountingRun()
        rig = Rig(auth=settings(htpasswd=path), auth_run=run)
        self.successResultOf(rig.gate.check_file())
        self.assertNotIn("read_users", run.ran)
        htpasswd({"ci": "rotated", "new": "user"}, path)
        self.successResultOf(rig.gate.check_file())
        self.assertIn("read_users", run.ran)
        self.assertEqual(rig.client("/v2/", headers=basic("new", "user")).status(), 200)
        with open(path, "a") as f:
            f.write("broken\n")
        self.successResultOf(rig.gate.check_file())
        self.assertEqual(rig.client("/v2/", headers=basic("ci", "rotated")).status(), 200)
        self.assertTrue(any("Keeping the users" in e["log_format"] for e in events))


class ConfigTests(SynchronousTestCase):
    def test_options_and_environment_turn_it_on(self):
        """--htpasswd, --trusted-networks, --trusted-proxies and --anonymous (or REGCACHE_*) configure it."""
        path = htpasswd({"ci": PASSWORD})
        auth = load({"htpasswd": path, "trusted-networks": "10.0.0.0/8, fd00::/8"},
                    {"REGCACHE_ANONYMOUS": "cached-only", "REGCACHE_TRUSTED_PROXIES": "192.0.2.1"}).auth
        self.assertEqual(auth.htpasswd, path)
        self.assertEqual([str(n) for n in auth.trusted_networks], ["10.0.0.0/8", "fd00::/8"])
        self.assertEqual([str(n) for n in auth.trusted_proxies], ["192.0.2.1/32"])
        self.assertEqual(auth.anonymous, "cached-only")
        self.assertEqual(load({"trusted-networks": "10.0.0.0/8"}, {}).auth.anonymous, "deny")

    def test_bad_options_name_themselves(self):
        """A bad network or mode is one line naming the option."""
        with self.assertRaisesRegex(ConfigError, r"^--trusted-networks: not a network: '10\.0\.0\.1/8'"):
            load({"trusted-networks": "10.0.0.1/8"}, {})
        with self.assertRaisesRegex(ConfigError, r"^--anonymous: not one of deny, cached-only, allow: 'open'"):
            load({"anonymous": "open"}, {})

    def test_the_file_section_and_options_merge(self):
        """The config file's auth section is read; an option given as well wins over its key."""
        root = tempfile.mkdtemp(prefix="regcache-test-")
        path = os.path.join(root, "regcache.yaml")
        with open(path, "w") as f:
            f.write("upstreams: [{name: hub, urls: [https://registry-1.docker.io]}]\n"
                    "auth:\n  htpasswd: /etc/regcache/htpasswd\n  anonymous: cached-only\n"
                    "  trusted_networks: [10.0.0.0/8]\n  groups:\n    robots: [ci]\n")
        auth = load({"config": path}, {}).auth
        self.assertEqual((auth.htpasswd, auth.anonymous, auth.groups), ("/etc/regcache/htpasswd", "cached-only",
                                                                        {"robots": ("ci",)}))
        self.assertEqual(load({"config": path, "anonymous": "deny"}, {}).auth.anonymous, "deny")


class Recorder(Resource):
    """Passes every request on to the fake Hub, noting the Authorization each carried."""

    isLeaf = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.authorizations = []

    def render(self, request):
        self.authorizations.append(request.getHeader(b"authorization"))
        return self.inner.render(request)


class CachedOnlyTests(SynchronousTestCase):
    def setUp(self):
        self.recorders = []

        def wrap(resource):
            self.recorders.append(Recorder(resource))
            return self.recorders[-1]

        self.rig = HubRig(auth=settings(anonymous="cached-only"), wrap=wrap)
        self.small = self.rig.images["library/small:1"]

    def warm(self):
        """library/small:1 pulled by a logged-in client."""
        creds = basic("ci", PASSWORD)
        self.assertEqual(self.rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL, **creds}).status(),
                         200)
        for b in self.small.blobs():
            self.assertEqual(self.rig.get(f"/v2/library/small/blobs/{b.digest}", headers=creds).status(), 200)
        self.rig.get(f"/v2/library/small/referrers/{self.small.digest}", headers=creds)

    def test_cached_content_pulls_anonymously_with_no_upstream_request(self):
        """
        An anonymous client pulls what a logged-in one cached (tag, manifest
        by digest, blobs, referrers, a blob HEAD) and regcache sends
        upstream nothing at all for it.
        """
        self.warm()
        before = len(self.rig.hub.requests)
        self.assertEqual(self.rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL}).status(), 200)
        self.assertEqual(self.rig.get(f"/v2/library/small/manifests/{self.small.digest}").status(), 200)
        for b in self.small.blobs():
            c = self.rig.get(f"/v2/library/small/blobs/{b.digest}")
            self.assertEqual((c.status(), c.header("X-Cache")), (200, "hit"))
            self.assertEqual(self.rig.get(f"/v2/library/small/blobs/{b.digest}", "HEAD").status(), 200)
        self.assertEqual(self.rig.get(f"/v2/library/small/referrers/{self.small.digest}").status(), 200)
        self.assertEqual(len(self.rig.hub.requests), before)

    def test_the_ping_challenges_strangers_who_then_carry_on(self):
        """
        /v2/ challenges an anonymous stranger even in cached-only mode (so
        clients holding credentials learn to send them); one without any
        then sends an empty Basic login, which is anonymous, and gets the
        cache.
        """
        self.warm()
        c = self.rig.get("/v2/")
        self.assertEqual((c.status(), c.header("WWW-Authenticate")), (401, 'Basic realm="regcache"'))
        c = self.rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL, "Authorization": "Basic Og=="})
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "hit"))
        self.assertEqual(self.rig.metrics.client_auth_failures.labels("malformed")._value.get(), 0)

    def test_a_cached_tag_past_its_window_is_served_without_revalidating(self):
        """Past the tag window a cached-only client gets the cached digest, marked stale, and upstream is not asked."""
        self.warm()
        self.rig.pass_time(120)
        before = len(self.rig.hub.requests)
        c = self.rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual((c.status(), c.header("Docker-Content-Digest")), (200, self.small.digest))
        self.assertEqual((c.header("X-Cache"), c.header("Warning")), ("stale", '110 regcache "Response is Stale"'))
        c = self.rig.get(f"/v2/library/small/referrers/{self.small.digest}")
        self.assertEqual((c.status(), c.header("Warning")), (200, '110 regcache "Response is Stale"'))
        self.assertEqual(len(self.rig.hub.requests), before)

    def test_every_miss_is_a_challenge_with_no_upstream_request(self):
        """
        Whatever is not cached (a tag, a manifest by digest, a blob GET or
        HEAD, a tag list, referrers) answers an anonymous client 401 with
        the challenge, and upstream hears nothing of it.
        """
        large = self.rig.images["library/large:1"]
        for method, path in [("GET", "/v2/library/large/manifests/1"), ("HEAD", "/v2/library/large/manifests/1"),
                             ("GET", f"/v2/library/large/manifests/{large.digest}"),
                             ("GET", f"/v2/library/large/blobs/{large.layers[0].digest}"),
                             ("HEAD", f"/v2/library/large/blobs/{large.layers[0].digest}"),
                             ("GET", "/v2/library/small/tags/list"),
                             ("GET", f"/v2/library/large/referrers/{large.digest}")]:
            c = self.rig.get(path, method, headers={"Accept": ALL})
            self.assertEqual(c.status(), 401, path)
            self.assertEqual(c.header("WWW-Authenticate"), 'Basic realm="regcache"', path)
        self.assertEqual(list(self.rig.hub.requests), [])
        self.assertEqual(os.listdir(self.rig.store.tmp_dir), [])

    def test_a_logged_in_client_fetches_and_its_credentials_stay_here(self):
        """
        In cached-only mode a logged-in client still fetches misses, and
        its credentials are never sent upstream: regcache sends its own.
        """
        self.warm()
        self.assertTrue(self.rig.hub.requests)
        mine = basic("ci", PASSWORD)["Authorization"].encode()
        seen = [a for r in self.recorders for a in r.authorizations]
        self.assertTrue(seen)
        self.assertNotIn(mine, seen)
        self.assertFalse(any(a and PASSWORD.encode() in base64.b64decode(a.split(b" ")[1] + b"==")
                             for a in seen if a and a.startswith(b"Basic ")))


class StatusPageTests(SynchronousTestCase):
    def test_the_status_page_is_for_logged_in_and_trusted_clients_only(self):
        """
        With authentication on, /status and /status.json challenge a
        stranger (even one that may pull cached content anonymously: the
        page names what others pulled) and answer a logged-in client.
        """
        rig = HubRig(auth=settings(anonymous="cached-only"))
        for path in ("/status", "/status.json"):
            with self.subTest(path=path):
                c = rig.get(path)
                self.assertEqual(c.status(), 401)
                self.assertEqual(c.header("WWW-Authenticate"), 'Basic realm="regcache"')
                self.assertEqual(rig.get(path, headers=basic("ci", PASSWORD)).status(), 200)
