# test-case-name: tests.test_probe
"""
The rate-limit probe: Docker Hub's free ratelimitpreview/test check keeps
the remaining-quota figures fresh without a counted pull.
"""

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from regcache.errors import UpstreamError
from regcache.probe import RateLimitProbe
from tests.support import HubRig


class ProbeTests(SynchronousTestCase):
    def test_probe_reads_the_quota_without_a_pull(self):
        """One probe: a token for ratelimitpreview/test and a HEAD; the figures are fresh and no pull is spent or counted."""
        rig = HubRig(credentials=None)
        rig.hub.set_ratelimit(200, remaining=123)
        service = RateLimitProbe([rig.upstream], rig.reactor, 600)
        service.startService()
        rig.settle()
        stats = rig.stats()
        self.assertEqual(stats["manifest_heads"], {"ratelimitpreview/test": 1})
        self.assertEqual(stats["manifest_gets_total"], 0)
        self.assertEqual(stats["token_scopes"], {"repository:ratelimitpreview/test:pull": 1})
        self.assertEqual(stats["ratelimit"]["remaining"], 123)
        (usage,) = rig.accounting.snapshot()
        self.assertEqual((usage.credential, usage.limit, usage.remaining, usage.pulls_24h, usage.heads_6h),
                         ("anonymous", 200, 123, 0, 0))
        value = rig.metrics.registry.get_sample_value(
            "dockerhub_limit_remaining_requests_total",
            {"upstream": rig.upstream.key, "member": rig.upstream.host, "credential": "anonymous"})
        self.assertEqual(value, 123)
        self.assertEqual(rig.metrics.registry.get_sample_value(
            "regcache_upstream_requests_total",
            {"upstream": rig.upstream.key, "member": rig.upstream.host, "kind": "probe", "status": "200"}), 1)
        service.stopService()

    def test_probe_repeats_on_its_interval(self):
        """The probe runs at start and then every interval, and stops with the service."""
        rig = HubRig()
        service = RateLimitProbe([rig.upstream], rig.reactor, 600)
        service.startService()
        rig.settle()
        rig.hub.set_ratelimit(100, remaining=50)
        rig.reactor.advance(600)
        rig.settle()
        self.assertEqual(rig.stats()["manifest_heads"], {"ratelimitpreview/test": 2})
        self.assertEqual(rig.accounting.snapshot()[0].remaining, 50)
        service.stopService()
        rig.reactor.advance(600)
        rig.settle()
        self.assertEqual(rig.stats()["manifest_heads"], {"ratelimitpreview/test": 2})

    def test_a_failing_member_does_not_stop_the_probe(self):
        """A member whose check fails is logged; the next member is still checked, and so is the failing one later."""
        asked = []

        class Member:
            def __init__(self, host, answer):
                self.host, self.answer = host, answer

            def probe_ratelimit(self):
                asked.append(self.host)
                return self.answer()

        clock = Clock()
        members = [Member("a", lambda: fail(UpstreamError("upstream a answered 503", 503))),
                   Member("b", lambda: succeed(None))]
        service = RateLimitProbe(members, clock, 600)
        service.startService()
        clock.advance(600)
        self.assertEqual(asked, ["a", "b", "a", "b"])
        service.stopService()
