# test-case-name: tests.test_metrics
"""
Request metrics: every label value comes from a fixed set, so what clients
send (paths, methods) can never create a series.
"""

import random

from twisted.trial.unittest import SynchronousTestCase

from regcache.metrics import REQUEST_METHODS, REQUEST_ROUTES, REQUEST_STATUSES
from tests.support import HubRig, Rig


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
