# test-case-name: tests.test_hub
"""
Docker Hub as it really is, in memory: the real Upstream client and mirror
against the fake Hub (token realm, CDN redirects, rate limits, faults), all
on one MemoryReactorClock so that token expiry, revalidation windows and
timeouts are exact.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from regcache.auth import Credentials
from regcache.mirror import STALE_WARNING
from tests.support import HubRig

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ALL = ", ".join([SCHEMA2, LIST, OCI, OCI_INDEX])


def rig_digest(blob):
    from regcache.reference import Digest

    return Digest.parse(blob.digest)


def code(client):
    return json.loads(client.body())["errors"][0]["code"]


class TokenTests(SynchronousTestCase):
    def test_token_is_fetched_once_and_reused(self):
        """Requests in one scope share a cached token: one realm request for many pulls."""
        rig = HubRig()
        for _ in range(3):
            rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
            rig.reactor.advance(61)
        self.assertEqual(rig.stats()["token_requests"], 1)

    def test_token_is_refreshed_before_it_expires(self):
        """After its lifetime a token is fetched anew, before upstream would reject it."""
        rig = HubRig()
        rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        rig.reactor.advance(290)
        rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual(rig.stats()["token_requests"], 2)
        self.assertEqual(rig.stats()["unauthorized"], 1)

    def test_invalid_token_is_refetched_once(self):
        """Upstream revoking a token (invalid_token) costs one refetch, and the pull succeeds."""
        rig = HubRig()
        rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        rig.hub.expire_tokens()
        rig.reactor.advance(61)
        c = rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 200)
        self.assertEqual(rig.stats()["token_requests"], 2)

    def test_credentials_open_private_repos(self):
        """With the account's credentials, its private repo is pulled (Basic to the realm)."""
        rig = HubRig(credentials=Credentials("ci", "s3cret"))
        c = rig.get("/v2/ci/private/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 200)

    def test_private_or_missing_repo_is_a_404_not_a_401(self):
        """Hub's 401 insufficient_scope becomes MANIFEST_UNKNOWN: a client never sees a bare 401."""
        rig = HubRig()
        for path in ("/v2/ci/private/manifests/1", "/v2/nobody/nothing/manifests/1"):
            c = rig.get(path, headers={"Accept": ALL})
            self.assertEqual(c.status(), 404, path)
            self.assertEqual(code(c), "MANIFEST_UNKNOWN")

    def test_wrong_credentials_are_an_upstream_failure(self):
        """A realm refusing the account makes an uncached pull a 503, never a 401."""
        rig = HubRig(credentials=Credentials("ci", "wrong"))
        c = rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 503)

    def test_realm_failure_serves_the_cache(self):
        """When the token realm fails, cached tags keep being served (stale)."""
        rig = HubRig(credentials=Credentials("ci", "s3cret"), tag_ttl=60)
        self.assertEqual(rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL}).status(), 200)
        rig.reactor.advance(400)
        rig.hub.fault("status", scope="token", status=401)
        c = rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Warning"), STALE_WARNING)


class RedirectTests(SynchronousTestCase):
    def test_blob_redirect_is_followed_without_authorization(self):
        """The 307 to the CDN is followed here; the CDN never sees Authorization; the client sees 200."""
        rig = HubRig()
        blob = rig.images["library/multi:1"].layers[0]
        c = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        self.assertEqual(c.status(), 200)
        with open(blob.path, "rb") as f:
            self.assertEqual(c.body(), f.read())
        stats = rig.stats()
        self.assertEqual(stats["cdn_authorization"], 0)
        self.assertEqual(stats["cdn_blob_gets"][blob.digest], 1)
        self.assertIsNone(c.header("Location"))


class CountedPullTests(SynchronousTestCase):
    def setUp(self):
        self.rig = HubRig(tag_ttl=60)
        self.path = "/v2/library/small/manifests/1"

    def pull(self, path=None, method="GET"):
        return self.rig.get(path or self.path, method, headers={"Accept": ALL})

    def test_within_the_window_no_upstream_call(self):
        """A tag pulled again inside the revalidation window never reaches upstream."""
        self.pull()
        before = self.rig.stats()
        self.rig.reactor.advance(30)
        for _ in range(5):
            self.assertEqual(self.pull().status(), 200)
        after = self.rig.stats()
        self.assertEqual(after["manifest_heads_total"], before["manifest_heads_total"])
        self.assertEqual(after["manifest_gets_total"], before["manifest_gets_total"])

    def test_revalidation_is_a_head_and_costs_no_pull(self):
        """After the window, the tag is checked with one HEAD; an unchanged tag costs no GET."""
        self.pull()
        gets = self.rig.stats()["manifest_gets_total"]
        self.rig.reactor.advance(61)
        self.pull()
        stats = self.rig.stats()
        self.assertEqual(stats["manifest_gets_total"], gets)
        self.assertEqual(stats["manifest_heads_total"], 2)

    def test_failed_head_never_falls_back_to_get(self):
        """A HEAD that fails (503) is not retried as a counted GET."""
        self.pull()
        self.rig.reactor.advance(61)
        self.rig.hub.fault("status", scope="manifests", status=503)
        gets = self.rig.stats()["manifest_gets_total"]
        self.assertEqual(self.pull().status(), 200)
        self.assertEqual(self.rig.stats()["manifest_gets_total"], gets)

    def test_head_by_client_costs_no_pull(self):
        """A client HEAD of a tag is answered from an upstream HEAD alone."""
        c = self.pull(method="HEAD")
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Docker-Content-Digest"), self.rig.images["library/small:1"].digest)
        self.assertEqual(self.rig.stats()["manifest_gets_total"], 0)

    def test_get_only_for_digests_not_held(self):
        """Two tags naming one digest, and that digest pulled directly, cost one GET in all."""
        image = self.rig.images["library/small:1"]
        self.rig.hub.move_tag("library/small", "also", digest=image.digest)
        self.pull()
        self.pull("/v2/library/small/manifests/also")
        self.pull(f"/v2/library/small/manifests/{image.digest}")
        self.assertEqual(self.rig.stats()["manifest_gets_total"], 1)

    def test_moved_tag_is_followed(self):
        """When upstream moves a tag, the next revalidation serves the new digest."""
        self.pull()
        moved = self.rig.moved["library/small:1"]
        self.rig.hub.move_tag("library/small", "1", image=moved)
        self.rig.reactor.advance(61)
        c = self.pull()
        self.assertEqual(c.header("Docker-Content-Digest"), moved.digest)

    def test_ratelimit_headers_are_kept(self):
        """The latest ratelimit-limit/remaining (with the window) and source are recorded."""
        self.rig.hub.set_ratelimit(100, remaining=42)
        self.pull()
        rl = self.rig.accounting.ratelimit(self.rig.upstream.key, self.rig.upstream.host)
        self.assertEqual((rl.limit, rl.window), (100, 21600))
        self.assertEqual(rl.remaining, 41)
        self.assertEqual(rl.source, "127.0.0.1")
        self.assertIn(b"regcache_upstream_ratelimit_remaining", self.rig.metrics.render())


class CachedTag:
    """A mix-in for tests of a tag that was pulled once, and is then due for revalidation."""

    path = "/v2/library/small/manifests/1"

    def rig(self, later=61, **kw):
        """A rig with the tag cached, ``later`` seconds after its pull (past the 60 s window)."""
        rig = HubRig(tag_ttl=60, **kw)
        self.assertEqual(rig.get(self.path, headers={"Accept": ALL}).status(), 200)
        rig.reactor.advance(later)
        return rig

    def assertStale(self, rig, c):
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Warning"), STALE_WARNING)
        self.assertEqual(c.header("Docker-Content-Digest"), rig.images["library/small:1"].digest)


class StaleIfErrorTests(CachedTag, SynchronousTestCase):

    def test_429_serves_the_cached_tag(self):
        """A rate-limited revalidation serves the last known digest, with a Warning header."""
        rig = self.rig()
        rig.hub.fault("status", scope="manifests", status=429)
        self.assertStale(rig, rig.get(self.path, headers={"Accept": ALL}))

    def test_5xx_serves_the_cached_tag(self):
        """A 5xx revalidation serves the cached tag too."""
        rig = self.rig()
        rig.hub.fault("status", scope="manifests", status=502)
        self.assertStale(rig, rig.get(self.path, headers={"Accept": ALL}))

    def test_timeout_serves_the_cached_tag_after_the_header_timeout(self):
        """A hanging upstream costs the header timeout, then the cached tag is served."""
        rig = self.rig()
        rig.hub.fault("hang", scope="manifests")
        c = rig.client(self.path, headers={"Accept": ALL})
        rig.settle()
        self.assertEqual(c.raw(), b"")
        rig.pass_time(5.5)
        self.assertStale(rig, c)

    def test_another_clients_entry_stands_in(self):
        """
        During an outage, a client with a different Accept set is served
        what another kind of client got for the tag, if it accepts that
        media type, and refused if it does not.
        """
        rig = self.rig()
        rig.hub.fault("status", scope="manifests", status=503)
        containerd = ", ".join([SCHEMA2, LIST, OCI, OCI_INDEX, "*/*"])
        self.assertStale(rig, rig.get(self.path, headers={"Accept": containerd}))
        c = rig.client(self.path, headers={"Accept": OCI})
        rig.pass_time(3)
        self.assertEqual(c.status(), 503)

    def test_nothing_cached_and_429_is_toomanyrequests(self):
        """With nothing cached, a 429 upstream is TOOMANYREQUESTS with Retry-After."""
        rig = HubRig()
        rig.hub.fault("status", scope="manifests", status=429, retry_after=30)
        c = rig.get(self.path, headers={"Accept": ALL})
        self.assertEqual(c.status(), 429)
        self.assertEqual(code(c), "TOOMANYREQUESTS")
        self.assertEqual(c.header("Retry-After"), "30")

    def test_nothing_cached_and_5xx_is_503(self):
        """With nothing cached, an upstream 5xx is a 503."""
        rig = HubRig()
        rig.hub.fault("status", scope="manifests", status=500)
        c = rig.client(self.path, headers={"Accept": ALL})
        rig.pass_time(3)
        self.assertEqual(c.status(), 503)
        self.assertEqual(rig.stats()["manifest_heads_total"], 3, "retried within its budget")

    def test_max_stale_bounds_the_age(self):
        """Past --max-stale since its last good check, a tag is no longer served on error."""
        rig = self.rig(max_stale=120)
        rig.hub.fault("status", scope="manifests", status=503)
        self.assertStale(rig, rig.get(self.path, headers={"Accept": ALL}))
        rig.reactor.advance(120)
        c = rig.client(self.path, headers={"Accept": ALL})
        rig.pass_time(3)
        self.assertEqual(c.status(), 503)

    def test_429_backs_off(self):
        """
        While upstream answers a tag's HEAD with 429 (bodiless, so the
        abuse limit), regcache stops asking for the pause (2 s, twice as
        long each time a probe is still limited), then lets one request
        probe; the Hub answering again ends it at once, with no lockout
        left over.
        """
        rig = HubRig(tag_ttl=0)
        self.assertEqual(rig.get(self.path, headers={"Accept": ALL}).status(), 200)
        fault = rig.hub.fault("status", scope="manifests", status=429)
        heads = lambda: rig.stats()["manifest_heads_total"]
        seen = heads()
        asked = []
        for step in (0, 0, 2, 1, 3, 4):
            rig.reactor.advance(step)
            self.assertStale(rig, rig.get(self.path, headers={"Accept": ALL}))
            asked.append(heads() - seen)
        self.assertEqual(asked, [1, 1, 2, 2, 3, 3])
        rig.hub.faults.remove(fault)
        rig.reactor.advance(8)
        c = rig.get(self.path, headers={"Accept": ALL})
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "revalidated"))
        self.assertEqual(rig.get(self.path, headers={"Accept": ALL}).header("X-Cache"), "revalidated")
        self.assertEqual(heads() - seen, 5)

    def test_digest_pulls_never_need_upstream(self):
        """A cached digest is served while upstream hangs, with no wait at all."""
        rig = self.rig()
        rig.hub.fault("hang", scope="all")
        digest = rig.images["library/small:1"].digest
        c = rig.get(f"/v2/library/small/manifests/{digest}")
        self.assertEqual(c.status(), 200)


class RetryAndFaultTests(SynchronousTestCase):
    def blob(self, rig):
        return rig.images["library/multi:1"].layers[0]

    def test_blob_5xx_is_retried_with_backoff(self):
        """A transient 5xx on a blob is retried after a jittered pause and then succeeds."""
        rig = HubRig()
        blob = self.blob(rig)
        rig.hub.fault("status", scope="blobs", status=503, times=1)
        c = rig.client(f"/v2/library/multi/blobs/{blob.digest}")
        rig.pass_time(2)
        self.assertEqual(c.status(), 200)
        self.assertEqual(len(c.body()), blob.size)

    def test_wrong_bytes_are_never_cached(self):
        """
        Bytes that do not match the digest, all in before the client is
        answered (as here, where the fake Hub's whole body arrives at once),
        get a clean 502 UNAVAILABLE naming the mismatch, never a 200; they
        are not stored, and the next request fetches again.  A client that
        already had bytes is aborted one byte short instead:
        test_inflight's test_digest_mismatch_aborts_everyone_and_stores_nothing.
        """
        rig = HubRig()
        blob = self.blob(rig)
        rig.hub.fault("wrong", scope="blobs")
        c = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        self.assertEqual(c.status(), 502)
        self.assertFalse(c.aborted())
        self.assertEqual(code(c), "UNAVAILABLE")
        self.assertIn(f"does not match {blob.digest}", json.loads(c.body())["errors"][0]["message"])
        self.assertIsNone(rig.blob_file(rig_digest(blob)))
        rig.hub.clear_faults()
        c = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        with open(blob.path, "rb") as f:
            self.assertEqual(c.body(), f.read())
        self.assertEqual(rig.stats()["cdn_blob_gets"][blob.digest], 2)

    def test_a_dripping_blob_is_given_up_under_the_rate_floor(self):
        """
        An upstream that sends a blob a byte a second (never idle long
        enough to trip the idle timer) is resumed once each window falls
        under the rate floor, and after three slow tries the fill fails
        cleanly: the client is aborted and nothing is cached.  Once
        upstream is healthy the blob downloads whole.
        """
        rig = HubRig()
        blob = self.blob(rig)
        rig.hub.fault("drip", scope="blobs", chunk=1, interval=1.0)
        c = rig.client(f"/v2/library/multi/blobs/{blob.digest}")
        rig.pass_time(150, step=1.0)
        self.assertFalse(c.aborted())
        rig.pass_time(60, step=1.0)
        self.assertTrue(c.aborted())
        self.assertIsNone(rig.blob_file(rig_digest(blob)))
        self.assertEqual(sum(rig.stats()["cdn_range_gets"].values()), 2)
        self.assertEqual(rig.metrics.fills.labels("failed")._value.get(), 1)
        rig.hub.clear_faults()
        c = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        with open(blob.path, "rb") as f:
            self.assertEqual(c.body(), f.read())

    def test_short_body_is_resumed_with_range(self):
        """An upstream that ends the body early is asked for the rest with Range."""
        rig = HubRig()
        blob = self.blob(rig)
        rig.hub.fault("short", scope="blobs", times=1)
        c = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        with open(blob.path, "rb") as f:
            self.assertEqual(c.body(), f.read())
        self.assertFalse(c.aborted())
        self.assertGreaterEqual(sum(rig.stats()["cdn_range_gets"].values()), 1)

    def test_upstream_ignoring_range_on_resume(self):
        """A resume answered with 200 (Range ignored) skips what was already written."""
        rig = HubRig()
        blob = self.blob(rig)
        rig.hub.fault("short", scope="blobs", times=1)
        rig.hub.fault("norange", scope="blobs")
        c = rig.get(f"/v2/library/multi/blobs/{blob.digest}")
        with open(blob.path, "rb") as f:
            self.assertEqual(c.body(), f.read())


class ScriptedDayTests(SynchronousTestCase):
    def test_a_day_of_ci_costs_one_head_per_tag_and_round_and_one_get_per_manifest(self):
        """
        A scripted day of CI traffic (a round of six pulls every 15 minutes
        for 24 hours, some clients HEAD-then-GET like dockerd, some GET by
        tag, tags moving three times) reaches the Hub as exactly one HEAD
        per tag and round in which it was pulled (the window is 60 s: each
        round revalidates a tag once, the rest of the round is served from
        cache) and one counted GET, by digest, per distinct manifest
        clients were served: no GET by tag, no second GET, no blob request.
        """
        import random
        from collections import Counter

        rig = HubRig(tag_ttl=60)
        rng = random.Random(7)
        tags = ["library/small:1", "library/multi:1", "library/multiarch:1", "library/ociindex:1"]
        moves = {6 * 3600: "library/small:1", 12 * 3600: "library/multi:1", 18 * 3600: "library/multiarch:1"}
        # "repo:tag" -> rounds in which it was pulled; and each "repo@digest" served.
        rounds = Counter()
        served = set()
        for tick in range(96):
            now = tick * 900
            if now in moves:
                name = moves[now]
                repo, tag = name.split(":")
                rig.hub.move_tag(repo, tag, image=rig.moved[name])
            pulled = set()
            for _ in range(6):
                name = rng.choice(tags)
                repo, tag = name.split(":")
                pulled.add(name)
                if rng.random() < 0.5:
                    head = rig.get(f"/v2/{repo}/manifests/{tag}", "HEAD", headers={"Accept": ALL})
                    self.assertEqual(head.status(), 200)
                    ref = head.header("Docker-Content-Digest")
                else:
                    ref = tag
                top = rig.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": ALL})
                self.assertEqual(top.status(), 200)
                served.add(f"{repo}@{top.header('Docker-Content-Digest')}")
                doc = json.loads(top.body())
                for child in doc.get("manifests", [])[:1]:
                    c = rig.get(f"/v2/{repo}/manifests/{child['digest']}", headers={"Accept": ALL})
                    self.assertEqual(c.status(), 200)
                    served.add(f"{repo}@{child['digest']}")
            rounds.update(pulled)
            rig.reactor.advance(900)
        stats = rig.stats()
        self.assertEqual(stats["manifest_heads_by_ref"], dict(rounds))
        self.assertEqual(stats["manifest_gets_by_ref"], {ref: 1 for ref in served})
        self.assertEqual(stats["registry_blob_gets_total"] + stats["cdn_blob_gets_total"], 0)


class AcceptAndLoggingTests(SynchronousTestCase):
    def test_separate_accept_lines_are_merged_and_forwarded(self):
        """
        dockerd's separate Accept lines are merged: with the list type among
        them the manifest list comes back; with schema2 alone, Hub's
        linux/amd64 child does, and the two are cached as separate tag keys.
        """
        rig = HubRig()
        image = rig.images["library/multiarch:1"]
        lines = {"Accept": [SCHEMA2, LIST, OCI, OCI_INDEX]}
        c = rig.get("/v2/library/multiarch/manifests/1", headers=lines)
        self.assertEqual(c.header("Docker-Content-Digest"), image.digest)
        self.assertEqual(c.header("Content-Type"), LIST)
        c = rig.get("/v2/library/multiarch/manifests/1", headers={"Accept": SCHEMA2})
        self.assertEqual(c.header("Docker-Content-Digest"), image.child("amd64").digest)
        self.assertEqual(c.header("Content-Type"), SCHEMA2)

    def test_credentials_never_reach_the_log(self):
        """Neither the password nor a bearer token appears in any log event."""
        from twisted.logger import eventAsText, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        rig = HubRig(credentials=Credentials("ci", "s3cret"))
        rig.get("/v2/ci/private/manifests/1", headers={"Accept": ALL})
        rig.hub.fault("status", scope="manifests", status=503)
        rig.reactor.advance(61)
        rig.get("/v2/ci/private/manifests/1", headers={"Accept": ALL})
        text = "\n".join(eventAsText(e) + repr(e) for e in events)
        self.assertIn("ci/private", text)
        self.assertNotIn("s3cret", text)
        self.assertNotIn("Bearer ", text)
        self.assertNotIn("Basic ", text)


class TagListTests(SynchronousTestCase):
    def test_tag_list_is_forwarded_with_pagination_and_link_rewritten(self):
        """
        tags/list goes upstream with n and last (never ns), and a Link
        naming Hub's library/ name is rewritten to the name the client used.
        """
        rig = HubRig()
        rig.hub.move_tag("library/small", "2", digest=rig.images["library/small:1"].digest)
        c = rig.get("/v2/small/tags/list?n=1&ns=docker.io")
        self.assertEqual(c.status(), 200)
        self.assertEqual(json.loads(c.body())["tags"], ["1"])
        link = c.header("Link")
        self.assertIn("/v2/small/tags/list?", link)
        self.assertIn("last=1", link)
        seen = [r for r in rig.hub.requests if "/tags/list" in r["path"]]
        self.assertNotIn("ns=", seen[-1]["path"])


class DNSFailureTests(SynchronousTestCase):
    def test_dns_failure_serves_the_cached_tag(self):
        """An upstream whose name stops resolving is an outage like any other: the cached tag is served."""
        from twisted.internet.defer import fail
        from twisted.internet.error import DNSLookupError

        rig = HubRig(tag_ttl=60)
        path = "/v2/library/small/manifests/1"
        self.assertEqual(rig.get(path, headers={"Accept": ALL}).status(), 200)
        rig.reactor.advance(61)
        rig.upstream.http = type("Unresolvable", (), {
            "request": lambda self, *a, **k: fail(DNSLookupError("registry.fake")),
        })()
        c = rig.get(path, headers={"Accept": ALL})
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Warning"), STALE_WARNING)


class BoundedBodyTests(CachedTag, SynchronousTestCase):
    """
    Every body regcache reads whole from upstream (token, manifest, tag
    list, error page) ends within the idle timeout of a stall, within the
    body deadline however slowly it trickles, and at the size cap however
    much is sent.  HubRig's timeouts: header 5 s, idle 5 s, body 30 s.
    """

    def cached_rig(self):
        """A rig whose tag is cached and whose token has expired."""
        return self.rig(later=400)

    def test_stalled_token_body_serves_the_cache_then_recovers(self):
        """
        A token realm that sends its headers and then stalls costs the idle
        timeout: the cached tag is served stale, an uncached one fails, and
        once the realm recovers the next pull fetches a token and is fresh.
        """
        rig = self.cached_rig()
        rig.hub.fault("stall", scope="token")
        stale = rig.client(self.path, headers={"Accept": ALL})
        uncached = rig.client("/v2/library/multi/manifests/1", headers={"Accept": ALL})
        rig.pass_time(12)
        self.assertStale(rig, stale)
        self.assertEqual(uncached.status(), 503)
        rig.hub.clear_faults()
        rig.reactor.advance(61)
        fresh = rig.get(self.path, headers={"Accept": ALL})
        self.assertEqual(fresh.status(), 200)
        self.assertIsNone(fresh.header("Warning"))
        self.assertEqual(rig.get("/v2/library/multi/manifests/1", headers={"Accept": ALL}).status(), 200)

    def test_trickling_token_body_is_cut_at_the_deadline(self):
        """A token body sent a byte every 4 s (never idle for 5 s) is given up at the 30 s body deadline."""
        rig = self.cached_rig()
        rig.hub.fault("drip", scope="token", chunk=1, interval=4)
        c = rig.client(self.path, headers={"Accept": ALL})
        rig.pass_time(32)
        self.assertStale(rig, c)

    def test_huge_token_body_is_refused_at_the_cap(self):
        """A token realm streaming 300 MiB is cut off at the token cap; the cached tag is served."""
        rig = self.cached_rig()
        rig.hub.fault("huge", scope="token", chunk=256 * 1024, interval=0.5)
        c = rig.client(self.path, headers={"Accept": ALL})
        rig.pass_time(5)
        self.assertStale(rig, c)

    def failed_digest_pull(self, seconds, kind, **fault):
        """The error message of an uncached manifest pull, ``seconds`` into an upstream fault."""
        rig = HubRig()
        digest = rig.images["library/small:1"].digest
        rig.hub.fault(kind, scope="manifests", **fault)
        c = rig.client(f"/v2/library/small/manifests/{digest}")
        rig.pass_time(seconds)
        self.assertEqual(c.status(), 503)
        return json.loads(c.body())["errors"][0]["message"]

    def test_stalled_manifest_body_fails_within_the_idle_timeout(self):
        """A manifest body that stops half-way fails the uncached pull with a clear error, retries included."""
        self.assertIn("stopped sending the manifest", self.failed_digest_pull(12, "stall"))

    def test_trickling_manifest_body_is_cut_at_the_deadline(self):
        """A manifest body sent a byte every 4 s fails at the body deadline instead of taking for ever."""
        message = self.failed_digest_pull(32, "drip", chunk=1, interval=4)
        self.assertIn("took more than 30 s to send the manifest", message)

    def test_huge_manifest_is_refused_at_the_cap(self):
        """A manifest body past the manifest cap is refused once the cap is read."""
        message = self.failed_digest_pull(12, "huge", chunk=1024 * 1024, interval=0.5)
        self.assertIn("larger than", message)

    def test_endless_error_page_is_not_waited_for(self):
        """An upstream 503 whose error page trickles without end fails the pull by the body deadline."""
        self.assertIn("answered 503", self.failed_digest_pull(32, "huge", status=503, chunk=1024, interval=1))

    def test_huge_tag_list_is_refused_at_the_cap(self):
        """A tag list body past its cap is refused rather than buffered."""
        rig = HubRig()
        rig.hub.fault("huge", scope="tags", chunk=4 * 1024 * 1024, interval=0.5)
        c = rig.client("/v2/library/small/tags/list")
        rig.pass_time(12)
        self.assertEqual(c.status(), 503)
        self.assertIn("larger than", json.loads(c.body())["errors"][0]["message"])


def assert_in_words(case, client, host, *words):
    """The client's OCI error says what happened at ``host`` in words, with no exception repr in it."""
    message = json.loads(client.body())["errors"][0]["message"]
    for repr_mark in ("<", "Failure", "Error:", "Error(", "Exception"):
        case.assertNotIn(repr_mark, message)
    case.assertIn(host, message)
    for w in words:
        case.assertIn(w, message)
    return message


class ErrorWordsTests(SynchronousTestCase):
    """Each way upstream can fail reaches the client as a sentence naming the host."""

    digest_path = "/v2/library/small/manifests/sha256:" + "0" * 64

    def test_header_timeout(self):
        """A hanging upstream: 'did not answer within 5 s (--header-timeout)'."""
        rig = HubRig()
        rig.hub.fault("hang", scope="manifests")
        c = rig.client("/v2/library/small/manifests/1", headers={"Accept": ALL})
        rig.pass_time(20)
        self.assertEqual(c.status(), 503)
        assert_in_words(self, c, "upstream registry.fake", "did not answer within 5 s (--header-timeout)")

    def test_server_error(self):
        """An upstream 500: the status, the host, and what was not cached."""
        rig = HubRig()
        rig.hub.fault("status", scope="manifests", status=500)
        c = rig.client("/v2/library/small/manifests/1", headers={"Accept": ALL})
        rig.pass_time(5)
        assert_in_words(self, c, "upstream registry.fake", "answered 500", "library/small:1 is not cached")

    def test_rate_limit(self):
        """A 429 with nothing cached: TOOMANYREQUESTS saying who is rate limiting."""
        rig = HubRig()
        rig.hub.fault("status", scope="manifests", status=429)
        c = rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 429)
        assert_in_words(self, c, "upstream registry.fake", "rate limiting")

    def test_connection_cut_mid_response(self):
        """An upstream that cuts the connection mid-manifest: 'closed the connection mid-response'."""
        rig = HubRig()
        digest = rig.images["library/small:1"].digest
        rig.hub.fault("reset", scope="manifests")
        c = rig.client(f"/v2/library/small/manifests/{digest}")
        rig.pass_time(12)
        assert_in_words(self, c, "upstream registry.fake", "closed the connection mid-response")

    def test_token_server_refusing_credentials(self):
        """A realm refusing the account's credentials is named as the token server."""
        rig = HubRig(credentials=Credentials("ci", "wrong"))
        c = rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 503)
        assert_in_words(self, c, "token server auth.fake", "answered 401")

    def test_token_server_stalling(self):
        """A realm that stalls mid-token: 'stopped sending the token'."""
        rig = HubRig()
        rig.hub.fault("stall", scope="token")
        c = rig.client("/v2/library/small/manifests/1", headers={"Accept": ALL})
        rig.pass_time(20)
        assert_in_words(self, c, "token server auth.fake", "stopped sending the token for 5 s (--idle-timeout)")

    def test_refused_and_unresolvable(self):
        """Connection refused and a failed DNS lookup, as Twisted's Agent reports them, in words."""
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError, DNSLookupError

        for exc, words in ((ConnectionRefusedError("Connection refused"), "refused the connection"),
                           (DNSLookupError("no results for hostname lookup: registry.fake"), "DNS lookup of")):
            rig = HubRig()
            rig.upstream.http = type("Failing", (), {"request": lambda self, *a, exc=exc, **k: fail(exc)})()
            c = rig.client("/v2/library/small/manifests/1", headers={"Accept": ALL})
            rig.pass_time(12)
            self.assertEqual(c.status(), 503)
            assert_in_words(self, c, "upstream registry.fake", words)


class CacheHeaderTests(SynchronousTestCase):
    """
    ``X-Cache`` tells a client (``regcache prefetch``) what the mirror did
    for it, so a warm-up can report what was already cached.
    """

    path = "/v2/library/small/manifests/1"

    def test_manifest_answers_say_their_outcome(self):
        """A tag's first GET is a miss, then a hit; past the window, revalidated; in an outage, stale."""
        rig = HubRig(tag_ttl=60)
        outcomes = [rig.get(self.path, headers={"Accept": ALL}).header("X-Cache")]
        outcomes.append(rig.get(self.path, headers={"Accept": ALL}).header("X-Cache"))
        rig.reactor.advance(61)
        outcomes.append(rig.get(self.path, method="HEAD", headers={"Accept": ALL}).header("X-Cache"))
        rig.reactor.advance(61)
        rig.hub.fault("status", scope="manifests", status=503)
        outcomes.append(rig.get(self.path, headers={"Accept": ALL}).header("X-Cache"))
        self.assertEqual(outcomes, ["miss", "hit", "revalidated", "stale"])
        digest = rig.images["library/small:1"].digest
        c = rig.get(f"/v2/library/small/manifests/{digest}", headers={"Accept": ALL})
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "hit"))

    def test_blob_answers_say_their_outcome(self):
        """A blob's first GET is a miss, the next a hit, and a HEAD of a cached blob a hit."""
        rig = HubRig()
        path = f"/v2/library/small/blobs/{rig.images['library/small:1'].layers[0].digest}"
        first = rig.get(path)
        first.body()
        self.assertEqual((first.status(), first.header("X-Cache")), (200, "miss"))
        self.assertEqual(rig.get(path).header("X-Cache"), "hit")
        self.assertEqual(rig.get(path, method="HEAD").header("X-Cache"), "hit")


class HealthTests(CachedTag, SynchronousTestCase):
    def test_a_429_pause_shows_as_rate_limited_until_it_ends(self):
        """
        The upstream's health says when a 429 has paused uncached manifest
        fetches, and until when, for the status page; once the pause has
        passed it is up again.
        """
        rig = HubRig(tag_ttl=0)
        upstream = rig.policy.default.upstream
        self.assertEqual([h.state for h in upstream.health()], ["up"])
        self.assertEqual(rig.get(self.path, headers={"Accept": ALL}).status(), 200)
        rig.hub.fault("status", scope="manifests", status=429)
        self.assertStale(rig, rig.get(self.path, headers={"Accept": ALL}))
        [health] = upstream.health()
        self.assertEqual(health.state, "rate limited")
        self.assertGreater(health.until, rig.reactor.seconds())
        rig.reactor.advance(health.until - rig.reactor.seconds() + 1)
        self.assertEqual([h.state for h in upstream.health()], ["up"])
