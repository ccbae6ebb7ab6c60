# test-case-name: tests.test_routing
"""
Routing: which upstream serves a request, by ``?ns=``, by a host or alias
first in the path, or by default; and the refusal, with nothing fetched, of
a registry no upstream answers for.
"""

import json
import unittest

from twisted.internet.task import Clock

from regcache.errors import RegistryError
from regcache.policy import Policy, Registry
from regcache.reference import InvalidReference
from tests.support import HubRig, Rig, blob


class Named:
    """An upstream stand-in that only maps names, as Upstream.repository does."""

    def __init__(self, docker_hub=False):
        self.docker_hub = docker_hub

    def repository(self, name):
        return "library/" + name if self.docker_hub and "/" not in name else name


HUB = Registry("dockerhub", frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"}),
               Named(docker_hub=True), 60, None, alias="dockerhub")
GHCR = Registry("ghcr", frozenset({"ghcr.io"}), Named(), 60, None, alias="ghcr")
LOCAL = Registry("local", frozenset({"localhost:5000", "localhost"}), Named(), 60, None)


def policy(default=None):
    return Policy([HUB, GHCR, LOCAL], Clock(), default)


class RouteTests(unittest.TestCase):
    def route(self, name, ns=None, default=None):
        r = policy(default).route(name, ns)
        return r.registry.name, r.name, r.ns

    def refused(self, name, ns=None):
        with self.assertRaises(RegistryError) as e:
            policy().route(name, ns)
        return e.exception

    def test_ns_selects_the_upstream_answering_for_that_host(self):
        """?ns= picks the upstream whose hosts include it, case-insensitively and with its port."""
        self.assertEqual(self.route("owner/app", "ghcr.io"), ("ghcr", "owner/app", "ghcr.io"))
        self.assertEqual(self.route("owner/app", "GHCR.io"), ("ghcr", "owner/app", "GHCR.io"))
        self.assertEqual(self.route("app", "localhost:5000"), ("local", "app", "localhost:5000"))
        self.assertEqual(self.route("alpine", "docker.io"), ("dockerhub", "library/alpine", "docker.io"))
        self.assertEqual(self.route("alpine", "registry-1.docker.io")[:2], ("dockerhub", "library/alpine"))

    def test_unknown_ns_is_name_unknown_naming_the_registry(self):
        """An ns no upstream answers for is a 404 NAME_UNKNOWN that names it: never the default's content."""
        e = self.refused("library/small", "quay.io")
        self.assertEqual((e.status, e.code), (404, "NAME_UNKNOWN"))
        self.assertIn("quay.io", str(e.body()))
        # A host that merely contains a known one is not it.
        self.assertEqual(self.refused("app", "evil-ghcr.io").code, "NAME_UNKNOWN")
        self.assertEqual(self.refused("app", "ghcr.io:443").code, "NAME_UNKNOWN")

    def test_host_prefix_selects_and_is_dropped(self):
        """/v2/<host>/<name>/... goes to the upstream answering for the host, as <name>."""
        self.assertEqual(self.route("ghcr.io/owner/app"), ("ghcr", "owner/app", None))
        self.assertEqual(self.route("docker.io/alpine"), ("dockerhub", "library/alpine", None))
        self.assertEqual(self.route("localhost/app"), ("local", "app", None))
        self.assertEqual(self.route("localhost:5000/team/app"), ("local", "team/app", None))

    def test_alias_prefix_selects_and_is_dropped(self):
        """/v2/<alias>/<name>/... goes to the aliased upstream, as <name>."""
        self.assertEqual(self.route("ghcr/owner/app"), ("ghcr", "owner/app", None))
        self.assertEqual(self.route("dockerhub/library/nginx"), ("dockerhub", "library/nginx", None))
        self.assertEqual(self.route("dockerhub/nginx"), ("dockerhub", "library/nginx", None))

    def test_unknown_host_prefix_is_name_unknown(self):
        """A host first in the path that no upstream answers for is refused, naming it."""
        e = self.refused("quay.io/prometheus/node-exporter")
        self.assertEqual((e.status, e.code), (404, "NAME_UNKNOWN"))
        self.assertIn("quay.io", str(e.body()))

    def test_no_ns_no_prefix_is_the_default(self):
        """Without either, the default upstream serves the name; Docker Hub's one-component names are library/."""
        self.assertEqual(self.route("alpine"), ("dockerhub", "library/alpine", None))
        self.assertEqual(self.route("bitnami/redis"), ("dockerhub", "bitnami/redis", None))
        self.assertEqual(self.route("owner/app", default="ghcr"), ("ghcr", "owner/app", None))
        # One component is a name, even with a dot or named like an alias.
        self.assertEqual(self.route("ghcr.io"), ("dockerhub", "library/ghcr.io", None))
        self.assertEqual(self.route("ghcr"), ("dockerhub", "library/ghcr", None))

    def test_ns_with_its_own_prefix_drops_the_prefix(self):
        """With ns, a prefix naming the same upstream (a k3s rewrite) is dropped; another's is part of the name."""
        self.assertEqual(self.route("ghcr/owner/app", "ghcr.io"), ("ghcr", "owner/app", "ghcr.io"))
        self.assertEqual(self.route("ghcr.io/owner/app", "ghcr.io"), ("ghcr", "owner/app", "ghcr.io"))
        self.assertEqual(self.route("ghcr/app", "docker.io"), ("dockerhub", "ghcr/app", "docker.io"))

    def test_malformed_names_are_invalid_wherever_they_would_route(self):
        """
        A name outside the grammar is refused as a name (which the routes
        answer as 400 NAME_INVALID), prefix or not, ns or not.
        """
        for name, ns in [("ghcr.io/Owner/app", None), ("../x/y", None), ("ghcr.io/a//b", None),
                         ("-bad.io/x", None), ("Owner/app", "ghcr.io"), ("a/../b", None)]:
            with self.subTest(name=name, ns=ns):
                with self.assertRaises(InvalidReference) as e:
                    policy().route(name, ns)
                self.assertEqual(e.exception.kind, "name")


class RoutedRequestTests(unittest.TestCase):
    def test_unknown_ns_fetches_nothing(self):
        """A blob or manifest request for a registry no upstream answers for is a 404 with zero upstream requests."""
        rig = Rig()
        _, digest = blob(100)
        for path in (f"/v2/library/small/blobs/{digest}?ns=quay.io", f"/v2/quay.io/library/small/blobs/{digest}",
                     "/v2/library/small/manifests/1?ns=quay.io", "/v2/quay.io/library/small/tags/list"):
            with self.subTest(path=path):
                c = rig.client(path)
                self.assertEqual(c.status(), 404)
                error = json.loads(c.body())["errors"][0]
                self.assertEqual(error["code"], "NAME_UNKNOWN")
                self.assertIn("quay.io", error["message"])
        self.assertEqual((rig.upstream.calls, rig.upstream.heads), ([], []))

    def test_ns_is_echoed_in_oci_namespace(self):
        """A request routed by ?ns= says so in OCI-Namespace; one without ns gets no such header."""
        rig = HubRig()
        with_ns = rig.get("/v2/library/small/manifests/1?ns=docker.io")
        self.assertEqual((with_ns.status(), with_ns.header("OCI-Namespace")), (200, "docker.io"))
        without = rig.get("/v2/library/small/manifests/1")
        self.assertEqual((without.status(), without.header("OCI-Namespace")), (200, None))

    def test_tags_are_kept_per_upstream_and_blobs_once(self):
        """The same name through two upstreams is two tags (each checked upstream), one blob on disk."""
        rig = HubRig()
        other = Registry("other", frozenset({"other.example"}), rig.upstream, 60, None)
        rig.policy = Policy([*rig.policy.registries, other], rig.reactor)
        rig.routes.policy = rig.mirror.policy = rig.policy
        heads = lambda: [r for r in rig.hub.requests if r["method"] == "HEAD" and "/manifests/" in r["path"]]
        self.assertEqual(rig.get("/v2/library/small/manifests/1?ns=docker.io").status(), 200)
        first = len(heads())
        self.assertEqual(rig.get("/v2/library/small/manifests/1?ns=docker.io").status(), 200)
        self.assertEqual(len(heads()), first)
        # The token is cached by now: one HEAD is the other upstream's own check.
        self.assertEqual(rig.get("/v2/other.example/library/small/manifests/1").status(), 200)
        self.assertEqual(len(heads()), first + 1)
        manifest = json.loads(rig.get("/v2/library/small/manifests/1").body())
        layer = manifest["layers"][0]["digest"]
        a = rig.get(f"/v2/library/small/blobs/{layer}?ns=docker.io")
        b = rig.get(f"/v2/other.example/library/small/blobs/{layer}")
        self.assertEqual((a.status(), b.status(), a.body()), (200, 200, b.body()))
        gets = [r for r in rig.hub.requests if r["method"] == "GET" and layer in r["path"]]
        self.assertEqual(len(gets), 1)

    def test_tag_list_link_keeps_the_clients_path_and_ns(self):
        """A tag list's Link is rewritten to the client's path form: its prefix, or its ns."""
        rig = HubRig()
        other = Registry("other", frozenset({"other.example"}), rig.upstream, 60, None, alias="oth")
        rig.policy = Policy([*rig.policy.registries, other], rig.reactor)
        rig.routes.policy = rig.mirror.policy = rig.policy
        rig.hub.move_tag("library/small", "2", digest=rig.images["library/small:1"].digest)
        by_alias = rig.get("/v2/oth/library/small/tags/list?n=1")
        self.assertEqual(by_alias.status(), 200)
        self.assertIn("</v2/oth/library/small/tags/list?n=1&last=", by_alias.header("Link"))
        by_ns = rig.get("/v2/library/small/tags/list?n=1&ns=other.example")
        self.assertRegex(by_ns.header("Link"), r"^</v2/library/small/tags/list\?n=1&last=[^>&]+&ns=other.example>")
