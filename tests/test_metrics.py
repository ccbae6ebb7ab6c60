# test-case-name: tests.test_metrics
"""
Request metrics: every label value comes from a fixed set, so what clients
send (paths, methods) can never create a series.
"""

import json
import random
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from regcache.errors import UpstreamNotFound
from regcache.metrics import Metrics, REQUEST_METHODS, REQUEST_ROUTES, REQUEST_STATUSES
from tests.support import FedBody, HubRig, Rig, blob


def request_series(rig):
    """(route, method, status) of every regcache_requests_total series."""
    found = []
    for family in rig.metrics.registry.collect():
        if family.name == "regcache_requests":
            for sample in family.samples:
                if sample.name == "regcache_requests_total":
                    found.append((sample.labels["route"], sample.labels["method"], sample.labels["status"]))
    return found


class RequestLabelTests(SynchronousTestCase):
    def test_random_paths_and_methods_create_no_series(self):
        """
        A thousand requests with random paths and methods leave only series
        whose labels are in the fixed sets, however many distinct paths
        and methods were sent.
        """
        rig = Rig()
        rng = random.Random(3)
        for i in range(1000):
            method = rng.choice(["GET", "HEAD", "DELETE", f"X{rng.randrange(10 ** 6)}", "OPTIONS"])
            path = rng.choice([f"/{rng.random()}", f"/v2/{rng.random()}", f"/metrics/{i}",
                               f"/v2/library/a/nothing/{i}", "/v2/", f"/healthz?{i}"])
            rig.client(path, method)
        series = request_series(rig)
        self.assertLessEqual(len(series), len(REQUEST_ROUTES) * len(REQUEST_METHODS) * len(REQUEST_STATUSES))
        for route, method, status in series:
            self.assertIn(route, REQUEST_ROUTES)
            self.assertIn(method, REQUEST_METHODS)
            self.assertIn(status, REQUEST_STATUSES)
        self.assertIn("other", {method for _, method, _ in series})

    def test_routes_are_named_for_what_answered(self):
        """Each route kind of the registry API gets its own label; a pull path counts under its kind."""
        rig = HubRig()
        layer = rig.images["library/small:1"].layers[0].digest
        for path in ("/", "/healthz", "/readyz", "/metrics", "/v2/", "/v2/library/small/manifests/1",
                     f"/v2/library/small/blobs/{layer}", "/v2/library/small/tags/list", "/v2/library/small/x"):
            rig.get(path, "HEAD")
        routes = {route for route, _, _ in request_series(rig)}
        self.assertEqual(routes, {"root", "healthz", "readyz", "metrics", "v2", "manifests", "blobs", "tags",
                                  "other"})


def samples(metrics):
    """Every sample of every family: the series regcache keeps, histogram buckets included."""
    return [(s.name, tuple(sorted(s.labels.items()))) for f in metrics.registry.collect() for s in f.samples]


class Missing:
    """A Remote that has nothing: every request answers at once, as a miss."""

    key = "docker.io"

    def repository(self, name):
        return name

    def health(self):
        return []

    async def head_manifest(self, name, reference, accept, retry=False):
        raise UpstreamNotFound(name)

    async def get_manifest(self, name, reference, accept, expect=None, retry=False):
        raise UpstreamNotFound(name)

    async def open_blob(self, name, digest):
        raise UpstreamNotFound(name)

    async def head_blob(self, name, digest):
        raise UpstreamNotFound(name)

    async def tags_list(self, name, query):
        raise UpstreamNotFound(name)

    async def referrers(self, name, digest, artifact_type=None, retry=False):
        raise UpstreamNotFound(name)


def random_request(rng):
    """A method and path a hostile or broken client might send, reaching every route."""
    hexa = "%032x" % rng.getrandbits(128)
    name = rng.choice([hexa[:8], f"library/{hexa[:6]}", f"{hexa[:4]}/{hexa[4:9]}/{hexa[9:12]}", "small"])
    method = rng.choice(["GET", "HEAD", "DELETE", "PUT", "OPTIONS", "get", f"X{hexa[:6]}", "PATCH"])
    path = rng.choice([
        f"/{hexa}", f"/v2/{hexa}", f"/metrics/{hexa[:5]}", "/metrics", f"/healthz?{hexa}", "/v2/", "/",
        f"/v2/{name}/manifests/{hexa[:10]}", f"/v2/{name}/manifests/sha256:{hexa * 2}",
        f"/v2/{name}/blobs/sha256:{hexa * 2}", f"/v2/{name}/blobs/{hexa}", f"/v2/{name}/tags/list?n={hexa[:3]}",
        f"/v2/{name}/referrers/sha256:{hexa * 2}", f"/v2/{name}/%2e%2e/manifests/x", f"/v2/{name}/uploads/",
    ])
    return method, path


class SeriesTests(SynchronousTestCase):
    def test_ten_thousand_random_requests_add_no_series(self):
        """
        After a thousand random requests (every route, method and answer
        seen), nine thousand more with other random paths, names and
        methods leave the number of series of every metric unchanged.
        """
        rig = Rig(upstream=Missing())
        rng = random.Random(12)

        def send(n):
            for _ in range(n):
                # Hung up once answered, so that idle timers do not pile up.
                rig.client(*reversed(random_request(rng))).hang_up()

        send(1000)
        before = samples(rig.metrics)
        send(9000)
        after = samples(rig.metrics)
        self.assertEqual(len(after), len(before))
        self.assertEqual(set(after), set(before))
        # Enough happened for the check to mean something: every route answered.
        self.assertEqual({route for route, _, _ in request_series(rig)}, set(REQUEST_ROUTES) - {"readyz"})
        total = rig.metrics.registry.get_sample_value
        self.assertEqual(sum(s.value for f in rig.metrics.registry.collect() if f.name == "regcache_requests"
                             for s in f.samples if s.name == "regcache_requests_total"), 10000)
        self.assertIsNotNone(total("regcache_response_duration_seconds_count", {"kind": "manifest"}))


class CacheOutcomeTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.data, self.digest = blob(100_000)
        self.value = self.rig.metrics.registry.get_sample_value

    def test_blob_bytes_by_cache_result_and_the_dedupe_gauges(self):
        """
        One client starts a download (miss), two join it; while it runs the
        gauges show one download and three clients; a later client is a
        hit.  Each answer's bytes count under its result.
        """
        path = f"/v2/library/app/blobs/{self.digest}"
        clients = [self.rig.client(path) for _ in range(3)]
        body = FedBody(200, {b"Content-Length": [str(len(self.data)).encode()]})
        self.rig.upstream.answer(0, body)
        self.assertEqual(self.value("regcache_inflight_downloads", {}), 1)
        self.assertEqual(self.value("regcache_inflight_clients", {}), 3)
        body.feed(self.data)
        body.end()
        self.assertEqual([c.body() for c in clients], [self.data] * 3)
        self.assertEqual(self.value("regcache_inflight_downloads", {}), 0)
        self.assertEqual(self.value("regcache_inflight_clients", {}), 0)
        self.assertEqual(self.rig.client(path).body(), self.data)
        n = len(self.data)
        for result, sent in (("miss", n), ("join", 2 * n), ("hit", n)):
            self.assertEqual(self.value("regcache_cache_bytes_total", {"kind": "blob", "result": result}), sent)

    def test_manifest_and_blob_latency_histograms(self):
        """Time to first byte and to the end are observed per kind, on the reactor's clock."""
        path = f"/v2/library/app/blobs/{self.digest}"
        c = self.rig.client(path)
        self.rig.reactor.advance(2)
        body = FedBody(200, {b"Content-Length": [str(len(self.data)).encode()]})
        self.rig.upstream.answer(0, body)
        self.rig.reactor.advance(3)
        body.feed(self.data)
        body.end()
        self.assertEqual(c.body(), self.data)
        self.assertEqual(self.value("regcache_response_first_byte_seconds_sum", {"kind": "blob"}), 2)
        self.assertEqual(self.value("regcache_response_duration_seconds_sum", {"kind": "blob"}), 5)
        self.assertEqual(self.value("regcache_response_duration_seconds_count", {"kind": "blob"}), 1)
        self.assertEqual(self.value("regcache_response_first_byte_seconds_bucket", {"kind": "blob", "le": "1.0"}), 0)
        self.assertEqual(self.value("regcache_response_first_byte_seconds_bucket", {"kind": "blob", "le": "2.5"}), 1)


class LabelTests(SynchronousTestCase):
    def test_upstream_statuses_are_a_fixed_set(self):
        """Whatever code an upstream sends, its label is a known code, a class, or "other"."""
        metrics = Metrics()
        for code in (200, 299, 404, 451, 599, 999, 0, -1, "timeout", "error"):
            metrics.upstream_exchange("docker.io", "registry-1.docker.io", "ci", "manifest_get", code)
        statuses = {s.labels["status"] for s in metrics.upstream_requests.collect()[0].samples}
        self.assertEqual(statuses, {"200", "2xx", "404", "4xx", "5xx", "other", "timeout", "error"})
        self.assertEqual(metrics.registry.get_sample_value(
            "regcache_upstream_pulls_total", {"upstream": "docker.io", "member": "registry-1.docker.io"}), 2)

    def test_repositories_are_labels_only_when_allowed(self):
        """Only the allow-listed repositories become label values (Docker Hub's short names as library/)."""
        metrics = Metrics(repositories=["library/alpine", "ghcr.io/owner/app"])
        for path in (b"/v2/alpine/manifests/3", b"/v2/library/alpine/blobs/sha256:" + b"0" * 64,
                     b"/v2/ghcr.io/owner/app/manifests/v1", b"/v2/evil/manifests/1", b"/v2/a/b/c/tags/list"):
            metrics.count_request(path, b"GET", 200)
        found = {(s.labels["repository"], s.labels["route"], s.value)
                 for s in metrics.repository_requests.collect()[0].samples if s.name.endswith("_total")}
        self.assertEqual(found, {("library/alpine", "manifests", 1), ("library/alpine", "blobs", 1),
                                 ("ghcr.io/owner/app", "manifests", 1)})


DOCS = Path(__file__).resolve().parent.parent / "docs"


def exposed_names():
    """The name of every metric family regcache exposes, as the exposition writes it."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    # Counters are named without _total in the exposition's families; their
    # _created timestamps are prometheus-client's, not metrics of their own.
    return {name + "_total" if kind == "counter" else name for name, kind in families.items()
            if not name.endswith("_created")}


class DocsTests(SynchronousTestCase):
    def test_every_metric_is_documented(self):
        """docs/metrics.md names every metric regcache exposes, and none that it does not."""
        text = (DOCS / "metrics.md").read_text()
        documented = set(re.findall(r"^\| `((?:regcache|dockerhub)_\w+)`", text, re.M))
        self.assertEqual(documented, exposed_names())

    def test_dashboard_queries_are_written_out_and_use_real_metrics(self):
        """Each Grafana panel's PromQL is in docs/metrics.md as it is, and names only metrics regcache exposes."""
        dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
        blocks = "\n".join(re.findall(r"```promql\n(.*?)```", (DOCS / "metrics.md").read_text(), re.S))
        names = exposed_names()
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        self.assertGreaterEqual(len(exprs), 6)
        for expr in exprs:
            self.assertIn(expr, blocks.splitlines())
            for used in re.findall(r"\b((?:regcache|dockerhub)_\w+)", expr):
                self.assertIn(re.sub(r"_(bucket|sum|count)$", "", used), names)
