# test-case-name: tests.test_status
"""
The status page's figures: read from pull accounting, the metrics, the
fills and the upstreams' health, the same in /status.json and in the HTML,
and every value escaped in the HTML.
"""

import json
from html.parser import HTMLParser

from twisted.trial.unittest import SynchronousTestCase

from regcache.accounting import Usage
from regcache.status import POPULAR_BOUND, Popular
from tests.support import FedBody, HubRig, Rig, blob
from tests.test_shared import FakeBucket

ALL = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, " \
      "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"


class FakeUsage:
    """Pull accounting as the page reads it: a fixed snapshot."""

    def __init__(self, *usages):
        self.usages = list(usages)

    def snapshot(self):
        return list(self.usages)


class Page(HTMLParser):
    """Every element's attributes by id, the text of the page, and every tag name met."""

    def __init__(self, html: str):
        super().__init__()
        self.ids, self.tags, self.text, self.rows = {}, [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs

    def handle_data(self, data):
        self.text.append(data)

    def value(self, id_):
        return self.ids[id_]["data-value"]


def status_json(rig):
    c = rig.client("/status.json")
    assert c.status() == 200, c.raw()
    assert c.header("Content-Type") == "application/json"
    return json.loads(c.body())


def status_html(rig):
    c = rig.client("/status")
    assert c.status() == 200, c.raw()
    assert c.header("Content-Type") == "text/html; charset=utf-8"
    return c.body().decode("utf-8")


class PopularTests(SynchronousTestCase):
    def test_most_pulled_first_then_by_name(self):
        """The table lists names by pulls, most first, ties by name, at most ``n``."""
        p = Popular()
        for name, n in (("b", 2), ("a", 2), ("c", 5), ("d", 1)):
            for _ in range(n):
                p.add(name)
        self.assertEqual(p.top(3), [{"name": "c", "pulls": 5}, {"name": "a", "pulls": 2},
                                    {"name": "b", "pulls": 2}])

    def test_bounded_and_keeps_what_is_pulled_often(self):
        """
        However many names clients pull, the table holds at most its bound,
        and a stream of one-off names does not displace the popular ones.
        """
        p = Popular()
        for _ in range(3):
            p.add("library/alpine")
        for i in range(POPULAR_BOUND * 5):
            p.add(f"random/{i}")
        self.assertEqual(len(p), POPULAR_BOUND)
        self.assertEqual(p.top(1), [{"name": "library/alpine", "pulls": 3}])


class AccountingFiguresTests(SynchronousTestCase):
    def test_docker_hub_pulls_against_the_limit(self):
        """
        The headline sums Docker Hub's credentials (pulls, hourly bars,
        limit and what is left); another upstream's pulls are only in the
        per-credential table.
        """
        rig = Rig()
        hourly = [0] * 22 + [3, 4]
        rig.status.usage = FakeUsage(
            Usage("docker.io", "registry-1.docker.io", "ci", pulls_6h=7, pulls_24h=9, heads_6h=20,
                  hourly_pulls=hourly, limit=200, remaining=193, window=21600, source="ci-id", seen=50.0),
            Usage("ghcr.io", "ghcr.io", "anonymous", pulls_6h=100, pulls_24h=100),
        )
        data = status_json(rig)
        self.assertEqual(data["docker_hub"], {"pulls_6h": 7, "pulls_24h": 9, "limit": 200, "remaining": 193,
                                              "window": 21600, "hourly": hourly})
        self.assertEqual([(c["upstream"], c["credential"], c["pulls_6h"], c["remaining"])
                          for c in data["credentials"]],
                         [("docker.io", "ci", 7, 193), ("ghcr.io", "anonymous", 100, None)])
        page = Page(status_html(rig))
        self.assertEqual((page.value("pulls-6h"), page.value("pulls-24h"), page.value("limit"),
                          page.value("remaining")), ("7", "9", "200", "193"))
        bars = [int(a["data-pulls"]) for t, a in page.tags if t == "rect"]
        self.assertEqual(bars, hourly)

    def test_no_accounting_counts_nothing_and_says_so(self):
        """Without pull accounting the page shows zero pulls and an unknown limit, not an error."""
        rig = Rig()
        data = status_json(rig)
        self.assertEqual(data["docker_hub"], {"pulls_6h": 0, "pulls_24h": 0, "limit": None, "remaining": None,
                                              "window": None, "hourly": [0] * 24})
        self.assertEqual(data["credentials"], [])
        page = Page(status_html(rig))
        self.assertEqual(page.value("limit"), "")
        self.assertIn("No pulls counted yet.", "".join(page.text))

    def test_values_are_escaped(self):
        """
        Whatever a credential, member or detail holds reaches the HTML as
        text, never as markup.
        """
        rig = Rig()
        evil = '<script>alert("x")</script>'
        rig.status.usage = FakeUsage(Usage("docker.io", evil, evil, pulls_6h=1))
        html = status_html(rig)
        self.assertNotIn("<script", html)
        page = Page(html)
        self.assertIn(evil, page.text)
        self.assertEqual([a["data-credential"] for t, a in page.tags if a.get("class") == "credential"], [evil])
        self.assertNotIn("script", [t for t, _ in page.tags])

    def test_no_external_assets(self):
        """
        The page loads nothing: no script, no stylesheet or image link, and
        a Content-Security-Policy that would forbid one.
        """
        rig = Rig()
        c = rig.client("/status")
        self.assertIn("default-src 'none'", c.header("Content-Security-Policy"))
        page = Page(c.body().decode())
        self.assertEqual([t for t, _ in page.tags if t in ("script", "link", "img", "iframe")], [])
        self.assertEqual([a for _, a in page.tags if "src" in a], [])
        self.assertEqual([a["href"] for t, a in page.tags if t == "a"], ["status.json"])
        self.assertIn(("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}), page.tags)


class CacheFiguresTests(SynchronousTestCase):
    def test_hits_bytes_and_most_pulled_come_from_the_pulls(self):
        """
        A cold pull then a warm one: the hit ratio and the bytes served,
        fetched and saved are the metrics' own, and the image pulled by tag
        heads the most-pulled table.
        """
        rig = HubRig()
        image = rig.images["library/small:1"]
        layer = image.layers[0]
        for _ in range(2):
            self.assertEqual(rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL}).status(), 200)
            self.assertEqual(rig.get(f"/v2/library/small/blobs/{layer.digest}").status(), 200)
        self.assertEqual(rig.get(f"/v2/library/small/manifests/{image.digest}", headers={"Accept": ALL}).status(),
                         200)
        data = status_json(rig)
        samples = rig.metrics.registry.get_sample_value
        lookups = lambda result: sum(samples("regcache_cache_lookups_total", {"kind": k, "result": result}) or 0
                                     for k in ("blob", "manifest", "tag", "referrers"))
        hits = lookups("hit") + lookups("revalidated") + lookups("join") + lookups("stale")
        self.assertEqual((data["cache"]["hits"], data["cache"]["misses"]), (hits, lookups("miss")))
        self.assertGreater(data["cache"]["misses"], 0)
        self.assertGreater(data["cache"]["hits"], 0)
        self.assertAlmostEqual(data["cache"]["hit_ratio"], hits / (hits + lookups("miss")))
        size = layer.size
        self.assertEqual(data["bytes"], {"served": 2 * size, "fetched": size, "saved": size})
        self.assertEqual(data["top_images"], [{"name": "docker.io/library/small", "pulls": 2}])
        page = Page(status_html(rig))
        self.assertEqual(page.value("bytes-saved"), str(size))
        self.assertAlmostEqual(float(page.value("hit-ratio")), data["cache"]["hit_ratio"])

    def test_store_against_its_limit(self):
        """The store's bytes are the metric's, its limit the configured one."""
        rig = Rig()
        rig.status.max_size = 1000
        rig.metrics.store_bytes.set(250)
        data = status_json(rig)
        self.assertEqual(data["store"], {"bytes": 250, "limit": 1000, "used_ratio": 0.25, "evicted": 0})
        page = Page(status_html(rig))
        self.assertEqual((page.value("store-bytes"), page.value("store-limit")), ("250", "1000"))

    def test_upstream_health(self):
        """Each member's health is listed; an upstream pausing after a 429 shows as rate limited."""
        rig = HubRig()
        self.assertEqual([(u["upstream"], u["state"]) for u in status_json(rig)["upstreams"]], [("docker.io", "up")])
        rig.hub.fault("status", scope="manifests", status=429)
        self.assertEqual(rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL}).status(), 429)
        (member,) = status_json(rig)["upstreams"]
        self.assertEqual((member["state"], member["member"]), ("rate limited", rig.hub.hosts["registry"]))
        page = Page(status_html(rig))
        self.assertEqual([a["data-state"] for t, a in page.tags if a.get("class") == "member"], ["rate limited"])


class DownloadFiguresTests(SynchronousTestCase):
    def test_downloads_in_flight_with_progress_and_clients(self):
        """
        A download under way shows its bytes so far, its size and the
        clients following it, a second client joining included; once it
        lands it is gone from the list.
        """
        rig = Rig()
        data, digest = blob(100_000)
        first = rig.client(f"/v2/library/app/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [str(len(data)).encode()]})
        rig.upstream.answer(0, body)
        body.feed(data[:40_000])
        (shown,) = status_json(rig)["downloads"]
        self.assertEqual(shown, {"digest": str(digest), "repository": "library/app", "upstream": "hand-fed",
                                 "bytes": 40_000, "total": 100_000, "clients": 1})
        second = rig.client(f"/v2/library/app/blobs/{digest}")
        self.assertEqual([d["clients"] for d in status_json(rig)["downloads"]], [2])
        page = Page(status_html(rig))
        self.assertEqual([a for t, a in page.tags if t == "progress"], [{"value": "40000", "max": "100000"}])
        body.feed(data[40_000:])
        body.end()
        self.assertEqual((first.body(), second.body()), (data, data))
        self.assertEqual(status_json(rig)["downloads"], [])


class LevelsTests(SynchronousTestCase):
    def test_local_only_says_so(self):
        """Without a shared bucket, the page shows the local level's hits and says there is no other level."""
        rig = HubRig()
        for _ in range(2):
            rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        data = status_json(rig)
        # The second pull: the tag and its manifest, both from the store.
        self.assertEqual(data["levels"], {"local": {"hits": 2}, "shared": None})
        page = Page(status_html(rig))
        self.assertEqual(page.value("local-hits"), "2")
        self.assertIn("no-shared", page.ids)

    def test_both_levels_with_a_shared_bucket(self):
        """
        A replica that pulls what another fetched shows its answers from the
        bucket; the one that fetched shows what it shared.  The HTML carries
        the same figures.
        """
        bucket = FakeBucket()
        a, b = HubRig(bucket=bucket), HubRig(bucket=bucket)
        image = a.images["library/small:1"]
        for rig in (a, b):
            self.assertEqual(rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL}).status(), 200)
            for layer in image.blobs():
                self.assertEqual(rig.get(f"/v2/library/small/blobs/{layer.digest}").status(), 200)
        shared_a, shared_b = status_json(a)["levels"]["shared"], status_json(b)["levels"]["shared"]
        blobs = len(image.blobs())
        # B: the tag, the manifest and every blob came from the bucket.
        self.assertEqual(shared_b["hits"], 2 + blobs)
        self.assertEqual(shared_b["lookups"]["blob"], {"hit": blobs, "miss": 0, "failed": 0})
        self.assertEqual(shared_b["uploads"], 0)
        # A: its blobs, the manifest, the tag and the links went up.
        self.assertGreaterEqual(shared_a["uploads"], blobs + 2)
        self.assertEqual(shared_a["upload_failures"], 0)
        page = Page(status_html(b))
        self.assertEqual(page.value("bucket-hits"), str(2 + blobs))
        self.assertEqual(page.value("bucket-uploads"), "0")
        # Served from the bucket: no upstream download of B's own, so hits of the whole cache.
        self.assertEqual(status_json(b)["cache"]["misses"], 0)

    def test_leases_and_forwards_when_counted(self):
        """Leases won (or taken over) and requests forwarded come from the coordinator's counters."""
        from prometheus_client import Counter

        rig = HubRig(bucket=FakeBucket())
        metrics = rig.metrics
        if getattr(metrics, "leases", None) is None:
            metrics.leases = Counter("regcache_leases", "leases", ["result"], registry=metrics.registry)
        if getattr(metrics, "forwards", None) is None:
            metrics.forwards = Counter("regcache_forwards", "forwards", ["direction", "result"],
                                       registry=metrics.registry)
        metrics.leases.labels(result="won").inc(2)
        metrics.leases.labels(result="taken_over").inc()
        metrics.leases.labels(result="lost").inc()
        metrics.forwards.labels(direction="sent", result="ok").inc(4)
        metrics.forwards.labels(direction="served", result="ok").inc()
        shared = status_json(rig)["levels"]["shared"]
        self.assertEqual((shared["leases_won"], shared["forwarded"]), (3, 4))
        page = Page(status_html(rig))
        self.assertEqual((page.value("leases-won"), page.value("forwarded")), ("3", "4"))
