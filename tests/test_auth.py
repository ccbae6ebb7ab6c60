# test-case-name: tests.test_auth
"""
The token cache against the in-memory fake Hub's realm: tokens are shared
and reused, and the table of them stays bounded however many repository
names clients make up.
"""

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from regcache.auth import Realms, TokenCache, parse_challenge
from regcache.exchange import Limits
from regcache.errors import UpstreamError
from tests.fakes.hub import FakeHub
from tests.support import HubRig, hub_images

ALL = "application/vnd.docker.distribution.manifest.v2+json"


class TokenTableTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.hub = FakeHub(hub_images()[0].values(), clock=self.clock)
        self.treq = StubTreq(self.hub.app.resource())
        self.challenge = parse_challenge(f'Bearer realm="{self.hub.auth_url}/token",service="registry.docker.io"')

    def cache(self, limit):
        return TokenCache(self.treq, self.clock, None, Limits(self.clock, 5, 5, 30), "upstream registry.fake",
                          Realms("registry.fake", ["auth.fake"]), capacity=limit)

    def fetch(self, tokens, name):
        d = Deferred.fromCoroutine(tokens.authorization(self.challenge, f"repository:{name}:pull"))
        self.treq.flush()
        return self.successResultOf(d)

    def test_many_names_hold_at_most_the_limit(self):
        """A token per made-up repository name, fifty names: the table never holds more than its limit."""
        tokens = self.cache(limit=10)
        for i in range(50):
            self.fetch(tokens, f"nobody/made-up-{i}")
            self.assertLessEqual(len(tokens), 10)
        self.assertEqual(len(tokens), 10)

    def test_least_recently_used_goes_first(self):
        """A token in use survives; the one unused longest is dropped for a new one."""
        tokens = self.cache(limit=3)
        for name in ("a/a", "b/b", "c/c"):
            self.fetch(tokens, name)
        self.fetch(tokens, "a/a")
        self.fetch(tokens, "d/d")
        asked = self.hub.stats()["token_requests"]
        self.fetch(tokens, "a/a")
        self.assertEqual(self.hub.stats()["token_requests"], asked, "a/a was still held")
        self.fetch(tokens, "b/b")
        self.assertEqual(self.hub.stats()["token_requests"], asked + 1, "b/b had been dropped")

    def test_expired_tokens_are_dropped(self):
        """Tokens past their lifetime leave the table at the next fetch, limit or not."""
        tokens = self.cache(limit=100)
        for i in range(20):
            self.fetch(tokens, f"old/name-{i}")
        self.clock.advance(300)
        self.fetch(tokens, "new/name")
        self.assertEqual(len(tokens), 1)

    def test_failed_shared_fetch_leaves_nothing_behind(self):
        """
        Waiters that hang up and a fetch that fails leave no shared fetch
        behind: the next request asks the realm again and succeeds.
        """
        tokens = self.cache(limit=10)
        self.hub.fault("stall", scope="token", times=1)
        scope = "repository:library/small:pull"
        first = Deferred.fromCoroutine(tokens.authorization(self.challenge, scope))
        second = Deferred.fromCoroutine(tokens.authorization(self.challenge, scope))
        self.treq.flush()
        second.cancel()
        self.failureResultOf(second)
        self.clock.advance(5)
        self.treq.flush()
        self.assertIn("stopped sending the token", str(self.failureResultOf(first, UpstreamError).value))
        self.assertEqual(self.hub.stats()["token_requests"], 1)
        self.assertTrue(self.fetch(tokens, "library/small").startswith(b"Bearer "))
        self.assertEqual(self.hub.stats()["token_requests"], 2)


class UpstreamTokenTests(SynchronousTestCase):
    def test_pulls_of_made_up_names_keep_only_live_tokens(self):
        """Through the whole mirror: pulls of many missing repositories leave only live tokens held."""
        rig = HubRig()
        for i in range(20):
            self.assertEqual(rig.get(f"/v2/nobody/missing-{i}/manifests/1", headers={"Accept": ALL}).status(), 404)
        self.assertEqual(len(rig.upstream.tokens), 20)
        rig.reactor.advance(300)
        rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual(len(rig.upstream.tokens), 1)
