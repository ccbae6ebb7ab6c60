# test-case-name: tests.test_blob_head
"""
A HEAD of a blob costs no download: a cold one is asked upstream with a
HEAD, one being downloaded answers from the download, and nothing a HEAD
learns is cached.
"""

import os

from klein import Klein
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from regcache.auth import Credentials
from regcache.metrics import Metrics
from regcache.reference import Digest
from regcache.upstream import Timeouts, Upstream
from tests.support import FedBody, HubRig, Rig, blob


def stored(root):
    """Every file under the store's blobs/ and tmp/."""
    return [os.path.join(d, f) for sub in ("blobs", "tmp") for d, _, fs in os.walk(os.path.join(root, sub))
            for f in fs]


class HeadOfAColdBlobTests(SynchronousTestCase):
    def setUp(self):
        self.rig = HubRig()
        self.layer = self.rig.images["library/small:1"].layers[0]
        self.path = f"/v2/library/small/blobs/{self.layer.digest}"

    def test_cold_head_asks_upstream_with_a_head(self):
        """
        A HEAD of a blob regcache does not hold answers with upstream's
        size and the digest, costs one upstream HEAD and no GET, and leaves
        nothing on disk; a GET afterwards is a miss like any first GET.
        """
        c = self.rig.get(self.path, "HEAD")
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Content-Length"), str(self.layer.size))
        self.assertEqual(c.header("Docker-Content-Digest"), self.layer.digest)
        self.assertEqual(c.header("Accept-Ranges"), "bytes")
        self.assertEqual(c.body(), b"")
        stats = self.rig.stats()
        self.assertEqual(stats["registry_blob_heads"], {self.layer.digest: 1})
        self.assertEqual(stats["registry_blob_gets"], {})
        self.assertEqual(stats["cdn_blob_gets"], {})
        self.assertEqual(stored(self.rig.root), [])
        self.assertEqual(len(self.rig.fills), 0)
        got = self.rig.get(self.path)
        self.assertEqual(got.body(), self.layer.read_bytes())
        self.assertEqual(self.rig.stats()["cdn_blob_gets"], {self.layer.digest: 1})

    def test_cold_head_of_an_unknown_blob_is_a_404(self):
        """Upstream not knowing the blob is BLOB_UNKNOWN, with no body on the HEAD."""
        digest = "sha256:" + "0" * 64
        c = self.rig.get(f"/v2/library/small/blobs/{digest}", "HEAD")
        self.assertEqual(c.status(), 404)
        self.assertEqual(self.rig.stats()["registry_blob_heads"], {digest: 1})
        self.assertEqual(stored(self.rig.root), [])

    def test_head_with_a_range_answers_like_a_get(self):
        """A ranged HEAD of a cold blob carries the 206 headers a GET would."""
        c = self.rig.get(self.path, "HEAD", {"Range": "bytes=10-19"})
        self.assertEqual(c.status(), 206)
        self.assertEqual(c.header("Content-Range"), f"bytes 10-19/{self.layer.size}")
        self.assertEqual(c.header("Content-Length"), "10")
        self.assertEqual(self.rig.stats()["cdn_blob_gets"], {})


class HeadOfABlobBeingFilledTests(SynchronousTestCase):
    def test_head_answers_from_the_download(self):
        """
        A HEAD of a blob being downloaded answers with the download's size
        at once, asks upstream nothing, and a HEAD before upstream answered
        waits for that answer.
        """
        rig = Rig()
        data, digest = blob(5000, b"head")
        path = f"/v2/library/a/blobs/{digest}"
        first = rig.client(path)
        early = rig.client(path, "HEAD")
        self.assertEqual(early.raw(), b"")
        body = FedBody(200, {b"Content-Length": [b"5000"]})
        rig.upstream.answer(0, body)
        self.assertEqual(early.status(), 200)
        self.assertEqual(early.header("Content-Length"), "5000")
        body.feed(data[:100])
        late = rig.client(path, "HEAD")
        self.assertEqual(late.header("Content-Length"), "5000")
        self.assertEqual(late.header("Docker-Content-Digest"), str(digest))
        self.assertEqual(len(rig.upstream.calls), 1)
        self.assertEqual(rig.upstream.heads, [])
        body.feed(data[100:])
        body.end()
        self.assertEqual(first.body(), data)

    def test_head_of_a_cached_blob_asks_nobody(self):
        """A cached blob's HEAD is answered from the store."""
        rig = Rig()
        data, digest = blob(300, b"cached head")
        first = rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [b"300"]})
        rig.upstream.answer(0, body)
        body.feed(data)
        body.end()
        self.assertEqual(first.body(), data)
        c = rig.client(f"/v2/library/a/blobs/{digest}", "HEAD")
        self.assertEqual(c.header("Content-Length"), "300")
        self.assertEqual(len(rig.upstream.calls), 1)
        self.assertEqual(rig.upstream.heads, [])


class _Redirecting:
    """
    A registry that answers blob HEADs with a 307 to a storage host of
    another origin, which refuses a request carrying Authorization (as
    signed-URL stores do) and answers the size.
    """

    app = Klein()

    def __init__(self):
        self.seen = []

    @app.route("/v2/<path:rest>", methods=["HEAD", "GET"])
    def registry(self, request, rest):
        host = request.getHeader(b"host").decode()
        self.seen.append((host, request.method, request.getHeader(b"authorization")))
        if host.startswith("storage"):
            if request.getHeader(b"authorization") is not None:
                request.setResponseCode(400)
                return b""
            request.setHeader(b"content-length", b"1234")
            return b""
        if request.getHeader(b"authorization") is None:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="registry"')
            return b""
        request.setResponseCode(307)
        request.setHeader(b"location", b"http://storage.test/v2/blob/data?sig=1")
        request.setHeader(b"content-length", b"0")
        return b""


class HeadBlobUpstreamTests(SynchronousTestCase):
    def test_head_follows_redirects_without_authorization(self):
        """
        head_blob follows a redirect to another origin with a HEAD, without
        the registry's Authorization, and returns the size found there.
        """
        fake = _Redirecting()
        treq = StubTreq(fake.app.resource())
        reactor = MemoryReactorClock()
        upstream = Upstream("http://registry.test", treq, reactor, Metrics(), Credentials("u", "p"),
                            Timeouts(header=5, idle=5), jitter=lambda: 0.5, docker_hub=False)
        d = upstream.head_blob("a", Digest("sha256", "1" * 64))
        treq.flush()
        self.assertEqual(self.successResultOf(d), 1234)
        self.assertEqual([(h, m) for h, m, _ in fake.seen],
                         [("registry.test", b"HEAD"), ("registry.test", b"HEAD"), ("storage.test", b"HEAD")])
        self.assertIsNotNone(fake.seen[1][2])
        self.assertIsNone(fake.seen[2][2])
