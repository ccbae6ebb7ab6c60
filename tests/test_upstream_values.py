# test-case-name: tests.test_upstream_values
"""
Values from upstream that do not parse (a Location with a port out of range,
a realm with a broken IPv6 literal, a token that is not ASCII, a number in
digits that are not ASCII, lifetimes and pauses of absurd length) are
upstream failures in words: a clean OCI error, or the stale copy where
there is one; never a 500, never a table that keeps the bad value.
"""

import json

from twisted.web.resource import Resource
from twisted.trial.unittest import SynchronousTestCase

from regcache.health import ABUSE_FIRST
from regcache.mirror import STALE_WARNING
from tests.support import FedBody, HubRig, Rig, blob
from tests.test_hub import ALL

TAG = "/v2/library/small/manifests/1"


class Reshaping(Resource):
    """
    The fake Hub behind a layer that rewrites chosen answers just before
    their headers go out: ``rules`` holds (role, path part, status or None,
    edit(request) -> body bytes or None to keep the body).
    """

    isLeaf = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.rules = []

    def render(self, request):
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        path = request.path.decode("latin-1")
        rules = [r for r in self.rules if host.startswith(r[0]) and r[1] in path]
        if rules:
            write = request.write
            state = {"replaced": False}

            def reshaping(data):
                if not request.startedWriting:
                    for _, _, status, edit in rules:
                        if status is None or request.code == status:
                            body = edit(request, data)
                            if body is not None:
                                request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
                                state["replaced"] = True
                                return write(body)
                if not state["replaced"]:
                    write(data)

            request.write = reshaping
        return self.inner.render(request)


def header_rule(name, value):
    def edit(request, data):
        request.responseHeaders.setRawHeaders(name, [value])
    return edit


def body_rule(doc):
    def edit(request, data):
        return json.dumps(doc).encode()
    return edit


def token_rule(**changes):
    """The Hub's own token answer with ``changes`` made to it."""
    def edit(request, data):
        doc = json.loads(data)
        doc.update(changes)
        return json.dumps(doc).encode()
    return edit


class ValuesTests(SynchronousTestCase):
    def rig(self, **kw):
        self.reshaping = None

        def wrap(resource):
            self.reshaping = Reshaping(resource)
            return self.reshaping

        return HubRig(wrap=wrap, **kw)

    def cached_tag(self):
        """A rig with the tag pulled, past its revalidation window, with every token expired at the Hub."""
        rig = self.rig(tag_ttl=60)
        self.assertEqual(rig.get(TAG, headers={"Accept": ALL}).status(), 200)
        rig.reactor.advance(61)
        rig.hub.expire_tokens()
        return rig

    def assertCleanError(self, c, *statuses):
        self.assertIn(c.status(), statuses)
        error = json.loads(c.body())["errors"][0]
        self.assertIn(error["code"], ("UNAVAILABLE", "TOOMANYREQUESTS"))
        return error["message"]

    def assertStale(self, rig, c):
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Warning"), STALE_WARNING)
        self.assertEqual(c.header("Docker-Content-Digest"), rig.images["library/small:1"].digest)

    def layer(self, rig):
        return f"/v2/library/small/blobs/{rig.images['library/small:1'].layers[0].digest}"

    def test_blob_redirect_with_a_port_out_of_range(self):
        """A blob redirect to port 99999 is a 503 naming the unusable URL, and nothing is cached."""
        rig = self.rig()
        self.reshaping.rules.append(("registry", "/blobs/", 307, header_rule(b"location", b"http://127.0.0.1:99999/x")))
        c = rig.get(self.layer(rig))
        rig.pass_time(5)
        self.assertIn("unusable URL", self.assertCleanError(c, 502, 503))
        self.assertEqual(len(rig.store.index), 0)

    def test_blob_redirect_with_a_broken_ipv6_literal(self):
        """A blob redirect to ``http://[::1/x`` is a 503 too."""
        rig = self.rig()
        self.reshaping.rules.append(("registry", "/blobs/", 307, header_rule(b"location", b"http://[::1/x")))
        c = rig.get(self.layer(rig))
        rig.pass_time(5)
        self.assertIn("unusable URL", self.assertCleanError(c, 502, 503))

    def test_blob_redirect_to_a_host_the_client_cannot_encode(self):
        """
        A blob redirect to an IPv6 literal or a 64-character label (hosts
        treq refuses with an exception, not a failed request) is a clean
        error too; it was a 500.
        """
        for location in (b"http://[::1]:5000/x", b"http://" + b"a" * 64 + b".example/x"):
            with self.subTest(location=location):
                rig = self.rig()
                self.reshaping.rules[:] = [("registry", "/blobs/", 307, header_rule(b"location", location))]
                c = rig.get(self.layer(rig))
                rig.pass_time(5)
                self.assertIn("unusable URL", self.assertCleanError(c, 502, 503))

    def test_realm_with_a_broken_ipv6_literal_serves_stale(self):
        """A challenge whose realm does not split as a URL fails the revalidation, and the stale tag is served."""
        rig = self.cached_tag()
        self.reshaping.rules.append(
            ("registry", "/manifests/", 401, header_rule(b"www-authenticate", b'Bearer realm="http://[::1/token"')))
        self.assertStale(rig, rig.get(TAG, headers={"Accept": ALL}))

    def test_token_that_is_not_ascii_is_refused_and_not_cached(self):
        """
        A token with a non-ASCII character is no usable token: a clean 503
        with nothing cached, the stale tag with something cached, and the
        token table never holds it.
        """
        rig = self.rig()
        self.reshaping.rules.append(("auth", "/token", 200, body_rule({"token": "t\u00e9", "expires_in": 300})))
        c = rig.get(TAG, headers={"Accept": ALL})
        rig.pass_time(5)
        self.assertIn("no usable token", self.assertCleanError(c, 503))
        self.assertEqual(len(rig.upstream.tokens), 0)
        rig = self.cached_tag()
        self.reshaping.rules.append(("auth", "/token", 200, body_rule({"token": "t\u00e9", "expires_in": 300})))
        self.assertStale(rig, rig.get(TAG, headers={"Accept": ALL}))
        self.assertEqual(len(rig.upstream.tokens), 0)

    def test_token_lifetimes_are_clamped(self):
        """
        A token stated to live ``nan``, ``inf``, 1e300 or 10**400 seconds is
        fetched again within the hour, though the Hub would take it longer.
        """
        for stated in ("nan", "inf", 1e300, 10 ** 400):
            with self.subTest(expires_in=stated):
                rig = self.rig(token_ttl=10 ** 6)
                self.reshaping.rules.append(("auth", "/token", 200, token_rule(expires_in=stated)))
                self.assertEqual(rig.get(TAG, headers={"Accept": ALL}).status(), 200)
                asked = rig.stats()["token_requests"]
                rig.reactor.advance(3600)
                self.assertEqual(rig.get(TAG, headers={"Accept": ALL}).status(), 200)
                self.assertEqual(rig.stats()["token_requests"], asked + 1)

    def test_retry_after_is_clamped_to_six_hours(self):
        """
        A 429 asking for a pause of 999999999999 s pauses manifest requests
        six hours at most: the client is told so, and after six hours
        upstream is asked again.
        """
        rig = self.rig()
        fault = rig.hub.fault("status", scope="manifests", status=429, retry_after=999999999999)
        c = rig.get(TAG, headers={"Accept": ALL})
        self.assertCleanError(c, 429)
        self.assertLessEqual(int(c.header("Retry-After")), 6 * 3600)
        rig.hub.faults.remove(fault)
        rig.reactor.advance(6 * 3600)
        self.assertEqual(rig.get(TAG, headers={"Accept": ALL}).status(), 200)

    def test_retry_after_that_does_not_parse_is_ignored(self):
        """
        A Retry-After in digits that are not ASCII is no pause upstream
        asked for: regcache's own applies (a HEAD's 429 has no body, so it
        is the abuse limit's first pause).
        """
        rig = self.rig()
        self.reshaping.rules.append(("registry", "/manifests/", 429, header_rule(b"retry-after", "\u00b2".encode("latin-1"))))
        rig.hub.fault("status", scope="manifests", status=429, times=1)
        c = rig.get(TAG, headers={"Accept": ALL})
        self.assertCleanError(c, 429)
        self.assertEqual(c.header("Retry-After"), str(int(ABUSE_FIRST)))


class ContentRangeTests(SynchronousTestCase):
    def test_total_in_digits_that_are_not_ascii(self):
        """
        A resumed download whose 206 gives its total as ``²`` is read by
        its length instead, and the client gets the whole blob.
        """
        rig = Rig()
        data, digest = blob(1000, b"superscript")
        c = rig.client(f"/v2/library/a/blobs/{digest}")
        first = FedBody(200, {b"Content-Length": [b"1000"]})
        rig.upstream.answer(0, first)
        first.feed(data[:500])
        first.die()
        self.assertEqual(rig.upstream.calls[1][2], 500)
        rest = FedBody(206, {b"Content-Length": [b"500"], b"Content-Range": ["bytes 500-999/\u00b2".encode("latin-1")]})
        rig.upstream.answer(1, rest)
        rest.feed(data[500:])
        rest.end()
        self.assertEqual(c.body(), data)
        self.assertIn(digest, rig.store.index)
