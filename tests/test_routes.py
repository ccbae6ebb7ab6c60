# test-case-name: tests.test_routes
"""
The HTTP surface: probes, the v2 base, refusals that happen before anything
touches the disk or the upstream, and Range on cached blobs.
"""

import json
import os

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from regcache.routes import split_path
from tests.support import Rig, blob, conformance_cases


def cache_blob(rig, data, digest, repository="library/a"):
    """Store a blob as a fill from ``repository`` would, linked to it."""
    w = rig.store.new_writer(digest)
    w.write(data)
    assert w.matches(len(data))
    w.links.append(("docker.io", repository))
    w.commit()
    w.close()


def error_code(client):
    return json.loads(client.body())["errors"][0]["code"]


class ProbeTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()

    def test_root_and_health(self):
        """The seed's probes hit /; /healthz answers 200 too, and /readyz once the store is indexed."""
        from regcache.expiry import Expiry

        Expiry(self.rig.store, None, self.rig.reactor).startService()
        for path in ("/", "/healthz", "/readyz"):
            self.assertEqual(self.rig.client(path).status(), 200, path)

    def test_v2_base(self):
        """GET and HEAD /v2/ answer 200 with the API version header."""
        for method in ("GET", "HEAD"):
            c = self.rig.client("/v2/", method)
            self.assertEqual(c.status(), 200)
            self.assertEqual(c.header("Docker-Distribution-API-Version"), "registry/2.0")

    def test_v2_without_its_slash_is_the_base(self):
        """/v2 is answered as /v2/ (200, API version, {}), not with a redirect that has no Location."""
        for method in ("GET", "HEAD"):
            c = self.rig.client("/v2", method)
            self.assertEqual(c.status(), 200, method)
            self.assertEqual(c.header("Docker-Distribution-API-Version"), "registry/2.0")
            self.assertEqual(c.header("Content-Length"), "2")
        self.assertEqual(self.rig.client("/v2").body(), b"{}")

    def test_metrics_count_requests(self):
        """/metrics exposes the request counter in Prometheus text format."""
        self.rig.client("/v2/")
        text = self.rig.client("/metrics").body().decode()
        self.assertIn('regcache_requests_total{method="GET",route="v2",status="200"} 1.0', text)


class RefusalTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.before = sorted(os.walk(self.rig.root))

    def assertUntouched(self):
        self.assertEqual(self.rig.upstream.calls, [])
        self.assertEqual(sorted(os.walk(self.rig.root)), self.before)

    def test_push_methods_are_unsupported(self):
        """Pushes get 405 UNSUPPORTED: regcache is read-only."""
        for method, path in [
            ("PUT", "/v2/library/a/manifests/1"),
            ("POST", "/v2/library/a/blobs/uploads/"),
            ("PATCH", "/v2/library/a/blobs/uploads/x"),
            ("DELETE", "/v2/library/a/blobs/sha256:" + "a" * 64),
            ("POST", "/v2/"),
        ]:
            c = self.rig.client(path, method)
            self.assertEqual(c.status(), 405, (method, path))
            self.assertEqual(error_code(c), "UNSUPPORTED")
        self.assertUntouched()

    def test_every_405_names_the_allowed_methods(self):
        """
        Every 405, whether the route refused the method or the router did,
        carries an Allow header (RFC 9110 §15.5.6) with what the path takes.
        """
        for method, path, allowed in [
            ("PUT", "/v2/library/a/manifests/1", "GET, HEAD"),
            ("DELETE", "/v2/library/a/blobs/sha256:" + "a" * 64, "GET, HEAD"),
            ("POST", "/v2/library/a/tags/list", "GET, HEAD"),
            ("POST", "/v2/", "GET, HEAD"),
            ("OPTIONS", "/v2/library/a/manifests/1", "GET, HEAD"),
            ("POST", "/metrics", "GET, HEAD"),
            ("DELETE", "/healthz", "GET, HEAD"),
        ]:
            c = self.rig.client(path, method)
            self.assertEqual(c.status(), 405, (method, path))
            self.assertEqual(c.header("Allow"), allowed, (method, path))
            self.assertEqual(error_code(c), "UNSUPPORTED")
        self.assertUntouched()

    def test_unsupported_digest_algorithm_is_a_400(self):
        """
        A well-formed digest of an algorithm regcache cannot verify is a
        400 DIGEST_INVALID naming the algorithm (as distribution answers),
        not a 405: the method is fine, the digest is not.
        """
        for path in ["/v2/library/a/blobs/blake3:" + "a" * 64, "/v2/library/a/manifests/sha1:" + "a" * 40]:
            c = self.rig.client(path)
            self.assertEqual((c.status(), error_code(c)), (400, "DIGEST_INVALID"), path)
            self.assertIsNone(c.header("Allow"))
            message = json.loads(c.body())["errors"][0]["message"]
            self.assertIn(path.rsplit("/", 1)[1].split(":")[0], message)
            self.assertIn("sha256", message)
        self.assertUntouched()

    def test_catalog_is_not_offered(self):
        """
        /v2/_catalog is a 404 UNSUPPORTED saying a mirror has no catalog,
        not a complaint about the repository name.
        """
        for path in ("/v2/_catalog", "/v2/_catalog?n=10"):
            c = self.rig.client(path)
            self.assertEqual((c.status(), error_code(c)), (404, "UNSUPPORTED"), path)
            self.assertIn("catalog", json.loads(c.body())["errors"][0]["message"])
        self.assertUntouched()

    def test_traversal_and_bad_names(self):
        """Traversal, encoded slashes and bad names are a 400 before any disk or upstream work."""
        for path in [
            "/v2/../etc/blobs/sha256:" + "a" * 64,
            "/v2/library%2f..%2fx/blobs/sha256:" + "a" * 64,
            "/v2//etc/passwd/manifests/latest",
            "/v2/Library/A/manifests/latest",
            "/v2/a/b/../c/manifests/latest",
        ]:
            c = self.rig.client(path)
            self.assertEqual(c.status(), 400, path)
            self.assertEqual(error_code(c), "NAME_INVALID")
        self.assertUntouched()

    def test_bad_digest_and_tag(self):
        """A malformed digest is DIGEST_INVALID, a malformed tag a 400."""
        c = self.rig.client("/v2/library/a/blobs/sha256:../../x")
        self.assertEqual((c.status(), error_code(c)), (400, "DIGEST_INVALID"))
        c = self.rig.client("/v2/library/a/manifests/sha256:" + "A" * 64)
        self.assertEqual((c.status(), error_code(c)), (400, "DIGEST_INVALID"))
        c = self.rig.client("/v2/library/a/manifests/.bad")
        self.assertEqual(c.status(), 400)
        self.assertUntouched()

    def test_each_refused_reference_is_its_oci_error(self):
        """
        A name, tag or digest the grammar refuses is a 400 with the OCI code
        for its kind (an unverifiable algorithm is a bad digest) and the
        grammar's words as the message.
        """
        supported = "regcache verifies sha256, sha384, sha512"
        for path, code, message in [
            ("/v2/Library/a/manifests/latest", "NAME_INVALID", "invalid repository name: 'Library/a'"),
            ("/v2/library/a_/blobs/sha256:" + "a" * 64, "NAME_INVALID", "invalid repository name: 'library/a_'"),
            ("/v2/library/a/manifests/.bad", "TAG_INVALID", "invalid tag: '.bad'"),
            ("/v2/library/a/manifests/" + "t" * 129, "TAG_INVALID", f"invalid tag: {'t' * 129!r}"),
            ("/v2/library/a/blobs/sha256:" + "A" * 64, "DIGEST_INVALID", f"invalid sha256 digest: 'sha256:{'A' * 64}'"),
            ("/v2/library/a/manifests/sha256:x:y", "DIGEST_INVALID", "invalid digest: 'sha256:x:y'"),
            ("/v2/library/a/blobs/blake3:" + "a" * 64, "DIGEST_INVALID",
             f"digest algorithm 'blake3' is not supported ({supported})"),
        ]:
            c = self.rig.client(path)
            self.assertEqual(c.status(), 400, path)
            self.assertEqual(c.header("Content-Type"), "application/json", path)
            self.assertEqual(json.loads(c.body()), {"errors": [{"code": code, "message": message}]}, path)
        self.assertUntouched()

    def test_unknown_paths_get_oci_json(self):
        """A /v2/ path that is not part of the pull API gets an OCI error, not HTML."""
        c = self.rig.client("/v2/library/a/nothing")
        self.assertEqual(c.status(), 404)
        self.assertIn("errors", json.loads(c.body()))


class SplitPathTests(SynchronousTestCase):
    def test_split_routes_on_the_last_keyword(self):
        """A name may contain 'blobs' or 'manifests' components: the last keyword routes."""
        for path, expected in [
            ("library/alpine/manifests/3.20", ("library/alpine", "manifests", "3.20")),
            ("a/blobs/b/manifests/latest", ("a/blobs/b", "manifests", "latest")),
            ("a/manifests/b/blobs/sha256:x", ("a/manifests/b", "blobs", "sha256:x")),
            ("org/team/app/tags/list", ("org/team/app", "tags", "")),
            ("blobs/blobs/sha256:x", ("blobs", "blobs", "sha256:x")),
        ]:
            self.assertEqual(split_path(path), expected, path)

    def test_split_rejects_non_api_paths(self):
        """Paths without a pull-API keyword do not route."""
        self.assertIsNone(split_path("library/alpine"))
        self.assertIsNone(split_path("/manifests/x"))


class RangeTests(SynchronousTestCase):
    """
    The distribution-spec conformance table (PROTOCOL.md §6) on a cached
    2048-byte blob.
    """

    def setUp(self):
        self.rig = Rig()
        self.data, self.digest = blob(2048)
        cache_blob(self.rig, self.data, self.digest)
        self.path = f"/v2/library/a/blobs/{self.digest}"

    def get(self, value, method="GET"):
        return self.rig.client(self.path, method, {"Range": value} if value else {})

    def test_conformance_table(self):
        """Single ranges get an exact 206; past-the-end and inverted ranges a 416."""
        for value, status, content_range, body in conformance_cases(self.data):
            c = self.get(value)
            self.assertEqual(c.status(), status, value)
            self.assertEqual(c.header("Content-Range"), content_range, value)
            self.assertEqual(c.body(), body, value)
            if status == 206:
                self.assertEqual(c.header("Content-Length"), str(len(body)))

    def test_huge_positions_are_answered_like_any_past_the_end(self):
        """
        Positions of thousands of digits (more than int() takes) mean what
        any position past the end means: a 416 for a start, the whole blob
        for an end or a suffix; never a 500, for GET or HEAD.
        """
        huge = "9" * 4400
        cases = [
            (f"bytes={huge}-", 416, "bytes */2048", b""),
            (f"bytes={huge}-{huge}", 416, "bytes */2048", b""),
            (f"bytes=0-{huge}", 206, "bytes 0-2047/2048", self.data),
            (f"bytes=-{huge}", 206, "bytes 0-2047/2048", self.data),
            (f"bytes=2000-{'0' * 4400}2047", 206, "bytes 2000-2047/2048", self.data[2000:]),
        ]
        for value, status, content_range, body in cases:
            for method in ("GET", "HEAD"):
                c = self.get(value, method)
                self.assertEqual(c.status(), status, (value[:20], method))
                self.assertEqual(c.header("Content-Range"), content_range, (value[:20], method))
                self.assertEqual(c.body(), body if method == "GET" else b"", (value[:20], method))

    def test_inverted_ranges_are_refused(self):
        """
        A range whose last position is before its first is invalid (RFC
        9110 §14.1.1), which §14.2 lets a server ignore or reject; the
        conformance table rejects ``bytes=500-0`` with a 416, so every
        inverted range is a 416, ``bytes=5-3`` included.
        """
        for value in ("bytes=500-0", "bytes=5-3", "bytes=2047-2046"):
            c = self.get(value)
            self.assertEqual(c.status(), 416, value)
            self.assertEqual(c.header("Content-Range"), "bytes */2048", value)
            self.assertEqual(c.body(), b"", value)

    def test_malformed_ranges_are_ignored(self):
        """
        A Range regcache cannot read (another unit, no dash, letters, signs,
        bytes that are not ASCII) is ignored: a 200 with the whole blob.
        """
        for value in ("items=0-10", "bytes=abc", "bytes=1-2-3", "bytes=--5", "bytes=+1-2", "bytes=0x10-",
                      "bytes=1 0-20", "bytes=\xff-1"):
            c = self.get(value)
            self.assertEqual(c.status(), 200, value)
            self.assertEqual(c.body(), self.data, value)

    def test_multi_range_gets_the_whole_blob(self):
        """Several ranges are answered with a 200 and the full body, never a 416."""
        c = self.get("bytes=0-10,20-30")
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), self.data)

    def test_head_and_get_headers(self):
        """HEAD and GET both carry length, digest and Accept-Ranges; HEAD has no body."""
        for method in ("HEAD", "GET"):
            c = self.get(None, method)
            self.assertEqual(c.status(), 200)
            self.assertEqual(c.header("Content-Length"), "2048")
            self.assertEqual(c.header("Docker-Content-Digest"), str(self.digest))
            self.assertEqual(c.header("Accept-Ranges"), "bytes")
        self.assertEqual(self.get(None, "HEAD").body(), b"")

    def test_ns_is_tolerated(self):
        """containerd's ?ns= query does not change what is served."""
        c = self.rig.client(self.path + "?ns=docker.io")
        self.assertEqual(c.body(), self.data)
        self.assertEqual(self.rig.upstream.calls, [])


class ConnectionTests(SynchronousTestCase):
    def test_idle_connection_is_closed_but_a_slow_download_is_not(self):
        """
        A keep-alive connection idle for two minutes is closed; one whose
        blob response is still under way (waiting on a slow upstream) is
        left open however long it takes, and then completes.
        """
        from regcache.site import IDLE_CLIENT_TIMEOUT
        from tests.support import FedBody

        from regcache.inflight import RateFloor

        rig = Rig()
        rig.fills.floor = RateFloor(rate=0)  # this upstream is slow on purpose: no download floor
        idle = rig.client("/v2/")
        data, digest = blob(4096)
        busy = rig.client(f"/v2/library/a/blobs/{digest}")
        upstream = FedBody(200, {b"Content-Length": [b"4096"]})
        rig.upstream.answer(0, upstream)
        sent = 0
        for _ in range(IDLE_CLIENT_TIMEOUT // 10 + 1):
            upstream.feed(data[sent:sent + 100])
            sent += 100
            rig.reactor.advance(10)
        self.assertTrue(idle.transport.disconnecting)
        self.assertFalse(busy.transport.disconnecting)
        upstream.feed(data[sent:])
        upstream.end()
        self.assertEqual(busy.body(), data)


class TagListTests(SynchronousTestCase):
    def test_head_of_a_tag_list_is_a_get_without_body(self):
        """HEAD tags/list is allowed: the same status and headers as GET, and no body."""
        from tests.support import HubRig

        rig = HubRig()
        get = rig.get("/v2/small/tags/list")
        head = rig.get("/v2/small/tags/list", "HEAD")
        self.assertEqual(get.status(), 200)
        self.assertEqual(head.status(), 200)
        for name in ("Content-Type", "Content-Length", "Docker-Distribution-API-Version"):
            self.assertEqual(head.header(name), get.header(name), name)
        self.assertEqual(head.body(), b"")
        self.assertIn(b'"tags"', get.body())


@given(st.text(max_size=300))
def test_split_never_crashes(text):
    """Any string splits into (name, kind, rest) or does not route."""
    parts = split_path(text)
    assert parts is None or (len(parts) == 3 and parts[1] in ("manifests", "blobs", "tags"))
