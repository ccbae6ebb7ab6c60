# test-case-name: tests.test_health
"""
Never waiting on a sick upstream: the revalidate deadline, the circuit of
each registry, and 429s read for what they are.

First the Health of one registry on its own, on a task.Clock, through
every transition; then the whole mirror against the in-memory fake Hub
(HubRig), where a slow, hung or rate-limiting Hub must cost a client with a
cached copy nothing, and one without a clear error at once.
"""

import json

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from regcache.errors import UpstreamError, UpstreamHeld, UpstreamTimeout, UpstreamUnreachable
from regcache.headers import RETRY_AFTER_RANGE, retry_after, retry_after_seconds
from regcache.health import ABUSE_FIRST, FAILING, OPEN, PROBE_MAX, RUN, UP, Health, span
from regcache.metrics import Metrics
from regcache.mirror import STALE_WARNING
from regcache.policy import Policy, Registry
from twisted.web.http_headers import Headers
from tests.support import HubRig
from tests.test_hub import ALL

TAG = "/v2/library/small/manifests/1"
WHO = "upstream registry.example"
TIMEOUT = UpstreamTimeout(f"{WHO} did not answer within 5 s (--header-timeout)")


def message(c):
    return json.loads(c.body())["errors"][0]["message"]


class HealthRig:
    """One registry's Health on a Clock, its log events and its gauge at hand."""

    def __init__(self):
        self.clock = Clock()
        self.metrics = Metrics()
        self.health = Health(self.clock, WHO, "docker.io", "registry.example", self.metrics)
        self.events = []
        self.health.log = Logger(observer=self.events.append)

    def gauge(self):
        return self.metrics.registry.get_sample_value(
            "regcache_upstream_circuit_state", {"upstream": "docker.io", "member": "registry.example"})

    def fail(self, error=TIMEOUT):
        self.health.failed(self.health.admit(counted=False), error)

    def said(self, words):
        return [e for e in self.events if words in formatEvent(e)]


class CircuitTests(SynchronousTestCase):
    def held(self, rig, counted=False):
        with self.assertRaises(UpstreamHeld) as raised:
            rig.health.admit(counted)
        return raised.exception

    def test_starts_up(self):
        """A registry nothing has happened to is up, and its gauge says so."""
        rig = HealthRig()
        self.assertEqual(rig.health.state().state, "up")
        self.assertEqual(rig.gauge(), UP)

    def test_a_timeout_opens_the_circuit_at_once(self):
        """One timeout: the registry is open, requests are held back in words naming why, and the log says so."""
        rig = HealthRig()
        rig.fail()
        state = rig.health.state()
        self.assertEqual((state.state, state.until), ("open", 1.0))
        self.assertEqual(rig.gauge(), OPEN)
        error = self.held(rig)
        self.assertIsNone(error.status)
        self.assertEqual(str(error), f"{TIMEOUT}; not asked again for 1 s")
        self.assertEqual(len(rig.said("circuit open")), 1)

    def test_a_refused_connection_opens_it_too(self):
        """A connection refused is as decisive as a timeout."""
        rig = HealthRig()
        rig.fail(UpstreamUnreachable(f"{WHO} refused the connection"))
        self.assertIn("refused the connection", str(self.held(rig)))

    def test_a_run_of_5xx_opens_it(self):
        """5xx answers leave it failing but closed, until RUN of them in a row open it."""
        rig = HealthRig()
        for _ in range(RUN - 1):
            rig.fail(UpstreamError(f"{WHO} answered 503", 503))
        self.assertEqual(rig.health.state().state, "failing")
        self.assertEqual(rig.gauge(), FAILING)
        rig.health.released(rig.health.admit(False))
        rig.fail(UpstreamError(f"{WHO} answered 503", 503))
        self.assertEqual(rig.health.state().state, "open")

    def test_an_answer_ends_the_run(self):
        """An answer between failures starts the count again."""
        rig = HealthRig()
        for _ in range(RUN - 1):
            rig.fail(UpstreamError(f"{WHO} answered 502", 502))
        rig.health.answered(rig.health.admit(False))
        self.assertEqual(rig.health.state().state, "up")
        for _ in range(RUN - 1):
            rig.fail(UpstreamError(f"{WHO} answered 502", 502))
        self.assertEqual(rig.health.state().state, "failing")

    def test_one_probe_at_a_time_when_it_is_due(self):
        """
        Until the probe is due, everything is held; then exactly one request
        goes, the others are held while it is out, and its answer closes the
        circuit for all.
        """
        rig = HealthRig()
        rig.fail()
        rig.clock.advance(0.9)
        self.held(rig)
        rig.clock.advance(0.1)
        probe = rig.health.admit(False)
        self.assertIn("a probe is under way", str(self.held(rig)))
        rig.health.answered(probe)
        self.assertEqual(rig.health.state().state, "up")
        self.assertEqual(rig.gauge(), UP)
        rig.health.admit(False)
        self.assertEqual(len(rig.said("circuit closed")), 1)

    def test_failed_probes_back_off_to_30_s(self):
        """Each failed probe doubles the wait for the next, from 1 s up to 30 s, and a success resets it."""
        rig = HealthRig()
        rig.fail()
        waits = []
        for _ in range(7):
            state = rig.health.state()
            waits.append(state.until - rig.clock.seconds())
            rig.clock.advance(state.until - rig.clock.seconds())
            rig.fail(UpstreamError(f"{WHO} answered 500", 500))
        self.assertEqual(waits, [1, 2, 4, 8, 16, PROBE_MAX, PROBE_MAX])
        rig.clock.advance(PROBE_MAX)
        rig.health.answered(rig.health.admit(False))
        rig.fail()
        self.assertEqual(rig.health.state().until - rig.clock.seconds(), 1)

    def test_a_probe_given_up_frees_the_slot(self):
        """A probe whose client left taught nothing: the next request may probe."""
        rig = HealthRig()
        rig.fail()
        rig.clock.advance(1)
        rig.health.released(rig.health.admit(False))
        rig.health.answered(rig.health.admit(False))
        self.assertEqual(rig.health.state().state, "up")


class RateLimitTests(SynchronousTestCase):
    def test_the_pull_limit_holds_only_counted_requests(self):
        """A pull-limit 429 holds manifest GETs back with a 429; HEADs and blobs still go."""
        rig = HealthRig()
        rig.health.limited(rig.health.admit(True), pull_limit=True, retry_after=None)
        with self.assertRaises(UpstreamHeld) as raised:
            rig.health.admit(counted=True)
        self.assertEqual(raised.exception.status, 429)
        rig.health.answered(rig.health.admit(counted=False))
        self.assertEqual(rig.health.state().state, "rate limited")

    def test_the_pull_limit_lasts_until_the_window_has_room(self):
        """
        With the window known from the headers (200 per 6 h, the first pull
        an hour ago), the pause lasts the five hours left, says so in the
        issue's words, and then one GET probes.
        """
        rig = HealthRig()
        rig.health.observe(200, 150, 21600, counted=True)
        rig.clock.advance(3600)
        error = rig.health.limited(rig.health.admit(True), pull_limit=True, retry_after=None)
        self.assertEqual(str(error), f"{WHO} is rate limiting: your pull limit of 200 per 6 h is used up; "
                                     "5 h left in the window; not asked again for 5 h")
        self.assertEqual(error.retry_after, 5 * 3600)
        rig.clock.advance(5 * 3600 - 1)
        with self.assertRaises(UpstreamHeld):
            rig.health.admit(True)
        rig.clock.advance(1)
        probe = rig.health.admit(True)
        with self.assertRaises(UpstreamHeld):
            rig.health.admit(True)
        rig.health.answered(probe)
        rig.health.admit(True)

    def test_room_shown_on_any_answer_ends_the_pause(self):
        """A free HEAD whose headers show pulls left lifts the pause at once."""
        rig = HealthRig()
        rig.health.limited(rig.health.admit(True), pull_limit=True, retry_after=600)
        rig.health.observe(200, 0, 21600, counted=False)
        with self.assertRaises(UpstreamHeld):
            rig.health.admit(True)
        rig.health.observe(200, 3, 21600, counted=False)
        rig.health.admit(True)

    def test_the_abuse_limit_holds_everything_briefly(self):
        """A bare 429 holds every request for 2 s, then one probes; another bare 429 doubles the pause."""
        rig = HealthRig()
        rig.health.limited(rig.health.admit(False), pull_limit=False, retry_after=None)
        with self.assertRaises(UpstreamHeld) as raised:
            rig.health.admit(False)
        self.assertEqual((raised.exception.status, raised.exception.retry_after), (429, ABUSE_FIRST))
        rig.clock.advance(ABUSE_FIRST)
        error = rig.health.limited(rig.health.admit(False), pull_limit=False, retry_after=None)
        self.assertEqual(error.retry_after, 2 * ABUSE_FIRST)
        rig.clock.advance(2 * ABUSE_FIRST)
        rig.health.answered(rig.health.admit(False))
        self.assertEqual(rig.health.state().state, "up")

    def test_spans_read_as_a_person_would(self):
        """Waits in words: seconds, minutes, hours and minutes."""
        self.assertEqual([span(s) for s in (0.2, 5, 59.5, 720, 11520, 21600)],
                         ["1 s", "5 s", "60 s", "12 min", "3 h 12 min", "6 h"])


class RetryAfterTests(SynchronousTestCase):
    def test_hostile_values(self):
        """
        Retry-After values no honest upstream sends are clamped to 1 s to
        6 h, or ignored when they are no number: huge, 400 digits, negative,
        words, superscript digits.
        """
        low, high = RETRY_AFTER_RANGE
        cases = {"99999999": high, "9" * 400: None, "-1": None, "soon": None, "\u00b2": None, "0": low, "30": 30}
        for value, expected in cases.items():
            with self.subTest(value=value[:10]):
                headers = Headers({b"retry-after": [value.encode("utf-8")]})
                self.assertEqual(retry_after(headers), expected)

    def test_what_clients_are_told_is_always_a_number_in_range(self):
        """Whatever a pause is, the Retry-After sent to clients is whole seconds within the range."""
        for wait, expected in ((None, 60), (float("inf"), 60), (float("nan"), 60), (0.2, 1), (1e12, 21600), (4.5, 5)):
            with self.subTest(wait=wait):
                self.assertEqual(retry_after_seconds(wait), expected)

    def test_policy_failure_never_raises_on_a_wait(self):
        """policy.failure turns an infinite wait into a TOOMANYREQUESTS, never a 500."""
        policy = Policy([Registry("docker.io", frozenset({"docker.io"}), None, 60, None)], Clock())
        error = policy.failure(UpstreamError("upstream x is rate limiting", 429, retry_after=float("inf")), "x:1")
        self.assertEqual((error.code, error.headers["Retry-After"]), ("TOOMANYREQUESTS", "60"))


class CachedTag:
    def rig(self, **kw):
        """A HubRig with library/small:1 pulled, 61 s ago: due for revalidation."""
        rig = HubRig(tag_ttl=60, **kw)
        self.assertEqual(rig.get(TAG, headers={"Accept": ALL}).status(), 200)
        rig.reactor.advance(61)
        return rig

    def assertStale(self, rig, c):
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Warning"), STALE_WARNING)
        self.assertEqual(c.header("Docker-Content-Digest"), rig.images["library/small:1"].digest)
        self.assertEqual(c.header("X-Cache"), "stale")

    def heads(self, rig):
        return rig.stats()["manifest_heads_total"]


class DeadlineTests(CachedTag, SynchronousTestCase):
    def test_a_slow_check_is_answered_from_cache_at_the_deadline(self):
        """
        A tag check still out at 300 ms: the client gets the cached digest
        then, stale; the check goes on and, when the Hub answers 2 s later
        with a moved tag, the next client gets the new digest with no new
        HEAD.
        """
        rig = self.rig()
        moved = rig.moved["library/small:1"]
        rig.hub.move_tag("library/small", "1", image=moved)
        rig.hub.fault("slow", scope="manifests", delay=2.0, times=1)
        heads = self.heads(rig)
        c = rig.client(TAG, headers={"Accept": ALL})
        rig.settle()
        self.assertEqual(c.raw(), b"")
        rig.reactor.advance(0.29)
        rig.settle()
        self.assertEqual(c.raw(), b"")
        rig.reactor.advance(0.01)
        rig.settle()
        self.assertStale(rig, c)
        rig.reactor.advance(2)
        rig.settle()
        after = rig.get(TAG, headers={"Accept": ALL})
        self.assertEqual((after.status(), after.header("Docker-Content-Digest")), (200, moved.digest))
        self.assertEqual(after.header("X-Cache"), "hit")
        self.assertEqual(self.heads(rig), heads + 1)

    def test_the_deadline_is_per_registry(self):
        """--revalidate-deadline 1s: still waiting at 300 ms, answered from cache at 1 s."""
        rig = self.rig(revalidate_deadline=1.0)
        rig.hub.fault("slow", scope="manifests", delay=3.0, times=1)
        c = rig.client(TAG, headers={"Accept": ALL})
        rig.reactor.advance(0.5)
        rig.settle()
        self.assertEqual(c.raw(), b"")
        rig.reactor.advance(0.5)
        rig.settle()
        self.assertStale(rig, c)

    def test_nothing_to_stand_in_waits_for_the_check(self):
        """A tag never pulled has no copy to serve: the client waits for the slow check and gets its answer."""
        rig = HubRig()
        rig.hub.fault("slow", scope="manifests", delay=2.0, times=1)
        c = rig.client(TAG, headers={"Accept": ALL})
        rig.pass_time(1.5)
        self.assertEqual(c.raw(), b"")
        rig.pass_time(1)
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "miss"))

    def test_a_check_that_fails_after_the_deadline_is_logged_and_opens_the_circuit(self):
        """
        A hung Hub: the client is answered at the deadline; the check ends
        at the header timeout, its failure logged (no unhandled error), and
        the circuit is open: the next pull is answered at once with no
        request to the Hub.
        """
        rig = self.rig()
        rig.hub.fault("hang", scope="manifests")
        heads = self.heads(rig)
        c = rig.client(TAG, headers={"Accept": ALL})
        rig.reactor.advance(0.3)
        rig.settle()
        self.assertStale(rig, c)
        rig.pass_time(5)
        self.assertEqual([h.state for h in rig.upstream.health()], ["open"])
        again = rig.get(TAG, headers={"Accept": ALL})
        self.assertStale(rig, again)
        self.assertEqual(self.heads(rig), heads + 1)


class OpenCircuitTests(CachedTag, SynchronousTestCase):
    def opened(self):
        """A rig whose Hub hung long enough for the circuit to open, with the tag cached."""
        rig = self.rig()
        rig.hub.fault("hang", scope="all")
        rig.client(TAG, headers={"Accept": ALL})
        rig.pass_time(5.5)
        self.assertEqual(rig.upstream.health()[0].state, "open")
        return rig

    def test_uncached_pulls_fail_at_once_in_words(self):
        """
        With the circuit open, a manifest and a blob regcache lacks fail at
        once (no time passes), in words, with no request to the Hub.
        """
        rig = self.opened()
        before = rig.stats()
        c = rig.get("/v2/library/multi/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 503)
        self.assertIn("library/multi:1 is not cached and upstream registry.fake did not answer within 5 s "
                      "(--header-timeout); not asked again for", message(c))
        blob = rig.images["library/multi:1"].layers[0]
        b = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        self.assertEqual(b.status(), 503)
        self.assertIn("did not answer within 5 s", message(b))
        after = rig.stats()
        for counter in ("manifest_heads_total", "manifest_gets_total", "registry_blob_gets_total"):
            self.assertEqual(after[counter], before[counter], counter)

    def test_the_first_answer_after_recovery_closes_it(self):
        """The Hub is back: a second later one request probes, gets an answer, and the circuit is closed."""
        rig = self.opened()
        rig.hub.clear_faults()
        rig.reactor.advance(1)
        c = rig.get("/v2/library/multi/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 200)
        self.assertEqual(rig.upstream.health()[0].state, "up")


class TooManyRequestsTests(CachedTag, SynchronousTestCase):
    def test_the_pull_limit_pauses_only_manifest_gets(self):
        """
        The account has no pulls left: an uncached manifest fails with the
        limit and the time left in words, and the next is not even asked
        for; meanwhile cached tags revalidate with HEADs (fresh, not
        stale), blobs download, and once a HEAD shows room GETs go again.
        """
        rig = self.rig()
        rig.hub.set_ratelimit(200, 0)
        c = rig.get("/v2/library/multi/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 429)
        self.assertIn("upstream registry.fake is rate limiting: your pull limit of 200 per 6 h is used up; ",
                      message(c))
        self.assertIn("left in the window", message(c))
        gets = rig.stats()["manifest_gets_total"]
        again = rig.get("/v2/library/multiarch/manifests/1", headers={"Accept": ALL})
        self.assertEqual(again.status(), 429)
        self.assertEqual(rig.stats()["manifest_gets_total"], gets)
        heads = self.heads(rig)
        cached = rig.get(TAG, headers={"Accept": ALL})
        self.assertEqual((cached.status(), cached.header("X-Cache"), cached.header("Warning")),
                         (200, "revalidated", None))
        self.assertEqual(self.heads(rig), heads + 1)
        blob = rig.images["library/multi:1"].layers[0]
        b = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        self.assertEqual(b.status(), 200)
        self.assertEqual(rig.stats()["cdn_blob_gets"][blob.digest], 1)
        rig.hub.set_ratelimit(200, 5)
        rig.reactor.advance(61)
        rig.get(TAG, headers={"Accept": ALL})
        self.assertEqual(rig.get("/v2/library/multi/manifests/1", headers={"Accept": ALL}).status(), 200)

    def test_the_abuse_limit_pauses_everything_briefly(self):
        """
        A bare 429: every request to the Hub is held for 2 s (a cached tag
        is served stale with no HEAD, a blob download is refused with a
        429); after the pause one request probes, and the Hub answering
        ends it.
        """
        rig = self.rig()
        rig.hub.fault("status", scope="all", status=429, bare=True)
        c = rig.get("/v2/library/multi/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 429)
        self.assertIn("rate limiting every request", message(c))
        heads = self.heads(rig)
        self.assertStale(rig, rig.get(TAG, headers={"Accept": ALL}))
        blob = rig.images["library/multi:1"].layers[0]
        self.assertEqual(rig.get(f"/v2/library/multi/blobs/{blob.digest}").status(), 429)
        self.assertEqual(self.heads(rig), heads)
        self.assertEqual(rig.stats()["registry_blob_gets"].get(blob.digest, 0), 0)
        rig.hub.clear_faults()
        rig.reactor.advance(ABUSE_FIRST)
        self.assertEqual(rig.get("/v2/library/multi/manifests/1", headers={"Accept": ALL}).status(), 200)
        self.assertEqual(rig.upstream.health()[0].state, "up")

    def test_a_429_from_the_blob_host_pauses_like_the_registrys(self):
        """
        The CDN a blob is redirected to answering a bare 429 is the same
        abuse limit: the client is told so, and no request goes to the Hub
        (registry or CDN) for the pause, so clients retrying an uncached
        blob cannot turn the storm into one upstream GET each.
        """
        rig = self.rig()
        rig.hub.fault("status", scope="blobs", status=429, bare=True)
        blob = rig.images["library/multi:1"].layers[0]
        first = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        self.assertEqual(first.status(), 429)
        self.assertIn("rate limiting every request", message(first))
        for _ in range(5):
            self.assertEqual(rig.get(f"/v2/library/multi/blobs/{blob.digest}").status(), 429)
        self.assertEqual((rig.stats()["registry_blob_gets"][blob.digest], rig.stats()["cdn_blob_gets"][blob.digest]),
                         (1, 1))
        heads = self.heads(rig)
        self.assertStale(rig, rig.get(TAG, headers={"Accept": ALL}))
        self.assertEqual(self.heads(rig), heads)
        rig.hub.clear_faults()
        rig.reactor.advance(ABUSE_FIRST)
        again = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        self.assertEqual((again.status(), len(again.body())), (200, blob.size))

    def test_no_retry_after_makes_a_500(self):
        """Hostile Retry-After values on a pull-limit 429: the client always gets a 429 with a sane Retry-After."""
        for value in ("99999999", "9" * 400, "-1", "soon", "\u00b2"):
            with self.subTest(value=value[:10]):
                rig = HubRig()
                rig.hub.fault("status", scope="manifests", status=429, retry_after=value)
                digest = rig.images["library/small:1"].digest
                c = rig.get(f"/v2/library/small/manifests/{digest}")
                self.assertEqual(c.status(), 429)
                self.assertTrue(1 <= int(c.header("Retry-After")) <= 6 * 3600, c.header("Retry-After"))
