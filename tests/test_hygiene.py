# test-case-name: tests.test_hygiene
"""
What every upstream exchange owes the registries it talks to and the
credentials it carries: a User-Agent naming regcache on every request, and
credentials sent to no token realm off the registry's own domain.
"""

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from regcache import __version__
from regcache.auth import Credentials, Realms
from regcache.errors import UpstreamError
from regcache.metrics import Metrics
from regcache.upstream import Timeouts, Upstream
from tests.fakes.hub import FakeHub
from tests.support import HubRig, hub_images

ALL = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, " \
      "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


class UserAgentTests(SynchronousTestCase):
    def test_every_upstream_request_names_regcache(self):
        """
        The token request, the manifest HEAD and GET, the registry's blob
        GET, its CDN hop and the tag list all carry regcache's User-Agent.
        """
        rig = HubRig()
        image = rig.images["library/small:1"]
        self.assertEqual(rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL}).status(), 200)
        self.assertEqual(rig.get(f"/v2/library/small/blobs/{image.layers[0].digest}").status(), 200)
        self.assertEqual(rig.get("/v2/library/small/tags/list").status(), 200)
        self.assertEqual({r["host"] for r in rig.hub.requests}, {"auth", "registry", "cdn"})
        asked = {r["path"].split("?")[0].rsplit("/", 2)[-2] for r in rig.hub.requests if r["host"] == "registry"}
        self.assertLessEqual({"manifests", "blobs", "tags"}, asked)
        agents = {(r["host"], r["agent"]) for r in rig.hub.requests}
        self.assertEqual({agent for _, agent in agents}, {f"regcache/{__version__}"}, agents)


class RealmsTests(SynchronousTestCase):
    def test_own_registrable_domain_is_allowed(self):
        """A realm on the registry's registrable domain is asked: Docker Hub's auth.docker.io, ghcr.io's own."""
        self.assertTrue(Realms("registry-1.docker.io").allows("auth.docker.io"))
        self.assertTrue(Realms("ghcr.io").allows("ghcr.io"))
        self.assertTrue(Realms("mirror.gcr.io").allows("gcr.io"))

    def test_other_domains_are_refused(self):
        """A realm on another registrant's domain is refused, public suffixes (github.io) included."""
        self.assertFalse(Realms("registry-1.docker.io").allows("auth.docker.io.evil.example"))
        self.assertFalse(Realms("registry-1.docker.io").allows("evil.io"))
        self.assertFalse(Realms("owner.github.io").allows("attacker.github.io"))
        self.assertFalse(Realms("quay.io").allows("io"))

    def test_hosts_without_a_domain_match_exactly(self):
        """An IP literal or single-label host allows itself, on any port, and nothing else."""
        self.assertTrue(Realms("127.0.0.1").allows("127.0.0.1"))
        self.assertFalse(Realms("127.0.0.1").allows("127.0.0.2"))
        self.assertFalse(Realms("127.0.0.1").allows("0.0.1"))
        self.assertTrue(Realms("localhost").allows("LOCALHOST"))
        self.assertFalse(Realms("localhost").allows("registry"))

    def test_configured_realms_are_allowed(self):
        """A realm host the config lists for the upstream is asked, however foreign its domain."""
        self.assertTrue(Realms("registry.example.com", ["auth.example.net"]).allows("auth.example.net"))
        self.assertFalse(Realms("registry.example.com", ["auth.example.net"]).allows("x.example.net"))


class ForeignRealmTests(SynchronousTestCase):
    def test_foreign_realm_gets_no_request_and_no_credentials(self):
        """
        A registry whose challenge names a realm off its domain fails in
        words naming that realm, loudly logged, and the realm is never
        asked: no token request arrives there, so no credentials either.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        reactor = MemoryReactorClock()
        current, _ = hub_images()
        hub = FakeHub(current.values(), clock=reactor, registry_host="registry.fake",
                      auth_host="tokens.elsewhere.example", users={"ci": "s3cret"})
        treq = StubTreq(hub.resource())
        upstream = Upstream(hub.registry_url, treq, reactor, Metrics(), Credentials("ci", "s3cret"),
                            Timeouts(header=5, idle=5), jitter=lambda: 0.5, docker_hub=True)
        d = Deferred.fromCoroutine(upstream.head_manifest("library/small", "1", [ALL]))
        treq.flush()
        error = self.failureResultOf(d, UpstreamError).value
        self.assertIn("tokens.elsewhere.example", str(error))
        self.assertIn("not on its own domain", str(error))
        self.assertEqual(hub.stats()["token_requests"], 0)
        self.assertEqual([r for r in hub.requests if r["host"] == "auth"], [])
        refusals = [e for e in events if e["log_level"] == LogLevel.error and "realm" in e]
        self.assertEqual([e["realm"] for e in refusals], ["http://tokens.elsewhere.example/token"])
