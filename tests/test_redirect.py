"""
Redirects to the bucket (regcache.redirect): which blob GETs get a 307 to a
presigned URL, and which are served as without redirects.
"""

import hashlib
import shutil

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from regcache.redirect import host_name, keeps_authorization
from regcache.s3 import BucketSettings, ObjectInfo, StorageError
from regcache.shared import SharedLevel, blob_name
from tests.support import FedBody, Rig, blob


class FakeBucket:
    """
    An in-memory stand-in for regcache.s3.S3 with what redirects use: HEAD
    (answered, failed, or never), presigned URLs, uploads and GETs (none
    found: fills go upstream).
    """

    def __init__(self, endpoint="https://bucket.example.net"):
        self.settings = BucketSettings(endpoint, "cache", "key", "secret")
        self.objects = {}
        self.heads = []
        self.broken = False
        self.hang = False
        self.uploads = 0
        self.broken_uploads = False

    async def head(self, name):
        self.heads.append(name)
        if self.broken:
            raise StorageError("the object store answered 500 to HEAD", 500)
        if self.hang:
            await Deferred()
        data = self.objects.get(name)
        return None if data is None else ObjectInfo(len(data), '"etag"', {})

    async def open(self, name, start=0):
        return None

    def presign(self, name, expires=900):
        return f"{self.settings.endpoint}/cache/{name}?X-Amz-Expires={expires}&X-Amz-Signature=abc"

    async def upload(self, name, path, size, sha256, content_type, metadata=None):
        self.uploads += 1
        if self.broken_uploads:
            raise StorageError("the object store answered 503 to PUT", 503)
        with open(path, "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).hexdigest() == sha256
        created = name not in self.objects
        self.objects.setdefault(name, data)
        return created


class RecordedUses:
    """regcache.sweeper.Uses as the mirror sees it, keeping the digests it is told were served."""

    def __init__(self, used):
        self.used = used.append


class RedirectTests(SynchronousTestCase):
    def setUp(self):
        self.bucket = FakeBucket()
        self.rig = self.make_rig(self.bucket)
        self.data, self.digest = blob(4096, b"redirected")
        self.path = f"/v2/library/alpine/blobs/{self.digest}"

    def make_rig(self, bucket, redirect=600):
        self.used = []
        uses = RecordedUses(self.used)
        rig = Rig(shared=lambda reactor, store, metrics: SharedLevel(bucket, store, metrics, reactor),
                  redirect=redirect, uses=uses)
        self.addCleanup(shutil.rmtree, rig.root, True)
        return rig

    def in_bucket(self):
        self.bucket.objects[blob_name(self.digest)] = self.data

    def held(self):
        """The blob in the local store, linked to library/alpine, as a pull through this replica leaves it."""
        w = self.rig.store.new_writer(self.digest)
        w.write(self.data)
        w.commit()
        w.close()
        self.rig.store.link(self.digest, ("docker.io", "library/alpine"))

    def confirm(self, size):
        """Upstream confirms, with a HEAD in the repository's scope, that it holds the blob."""
        name, digest, d = self.rig.upstream.heads.pop(0)
        self.assertEqual((name, digest), ("library/alpine", self.digest))
        d.callback(size)

    def lookups(self, result):
        return self.rig.metrics.shared_lookups.labels("blob_redirect", result)._value.get()

    def test_a_get_of_a_blob_in_the_bucket_is_redirected_to_a_presigned_url(self):
        """
        Once upstream confirmed the repository holds it, a GET of a blob
        only the bucket holds answers 307 to the presigned URL, with no
        body, and nothing is downloaded.
        """
        self.in_bucket()
        c = self.rig.client(self.path)
        self.confirm(len(self.data))
        self.assertEqual(c.status(), 307)
        self.assertEqual(c.header("Location"), self.bucket.presign(blob_name(self.digest), 600))
        self.assertEqual(c.header("Docker-Content-Digest"), str(self.digest))
        self.assertEqual(c.header("X-Cache"), "redirect")
        self.assertEqual(c.header("Content-Length"), "0")
        self.assertEqual(c.body(), b"")
        self.assertEqual(self.rig.upstream.calls, [])
        self.assertEqual(self.lookups("hit"), 1)
        self.assertEqual(self.used, [self.digest])

    def test_a_blob_held_in_both_levels_is_redirected(self):
        """A local copy does not keep a GET here: the bucket's copy is what redirects are for."""
        self.held()
        self.in_bucket()
        c = self.rig.client(self.path)
        self.assertEqual(c.status(), 307)
        self.assertEqual(self.rig.upstream.heads, [])

    def test_a_range_request_is_redirected_too(self):
        """A Range GET gets the same 307: the client sends its Range to the bucket, which answers it."""
        self.held()
        self.in_bucket()
        c = self.rig.client(self.path, headers={"Range": "bytes=100-199"})
        self.assertEqual(c.status(), 307)
        self.assertIsNone(c.header("Content-Range"))

    def test_a_head_is_answered_here(self):
        """A HEAD gets the blob's size from regcache: a URL presigned for GET would refuse it."""
        self.in_bucket()
        c = self.rig.client(self.path, method="HEAD")
        self.confirm(len(self.data))
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Content-Length"), str(len(self.data)))
        self.assertIsNone(c.header("Location"))

    def test_a_repository_not_known_to_hold_the_blob_gets_no_redirect(self):
        """
        The bucket's copy may be another repository's: where upstream does
        not confirm this one holds it, the answer is BLOB_UNKNOWN, and the
        bucket is never asked.
        """
        self.in_bucket()
        c = self.rig.client(self.path)
        name, digest, d = self.rig.upstream.heads.pop(0)
        from regcache.errors import UpstreamNotFound

        d.errback(UpstreamNotFound("blob"))
        self.assertEqual(c.status(), 404)
        self.assertIn(b"BLOB_UNKNOWN", c.body())
        self.assertEqual(self.bucket.heads, [])

    def test_a_blob_only_held_here_is_served_and_uploaded(self):
        """
        A blob the bucket lacks but the local store holds is served from
        here, and goes up to the bucket, so the next GET is redirected.
        """
        self.held()
        c = self.rig.client(self.path)
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), self.data)
        self.assertEqual(self.bucket.objects[blob_name(self.digest)], self.data)
        self.assertEqual(self.lookups("miss"), 1)
        again = self.rig.client(self.path)
        self.assertEqual(again.status(), 307)
        self.assertEqual(self.used, [self.digest, self.digest])

    def test_a_blob_the_bucket_still_lacks_is_uploaded_once_a_while(self):
        """GETs that come while a blob held here goes up (or after it failed) do not upload it again at once."""
        self.held()
        self.bucket.broken_uploads = True
        for _ in range(3):
            self.assertEqual(self.rig.client(self.path).status(), 200)
        self.assertEqual(self.bucket.uploads, 1)

    def test_a_blob_neither_level_holds_is_fetched_and_served(self):
        """With neither level holding it, the usual fill streams it to the client and shares it."""
        c = self.rig.client(self.path)
        self.confirm(len(self.data))
        body = FedBody(headers={"Content-Length": [str(len(self.data))]})
        self.rig.upstream.answer(0, body)
        body.feed(self.data)
        body.end()
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), self.data)
        self.assertEqual(self.bucket.objects[blob_name(self.digest)], self.data)

    def test_a_failing_bucket_means_serving_here(self):
        """When the bucket errs, a held blob is served from the local level, and no upload is tried."""
        self.held()
        self.bucket.broken = True
        c = self.rig.client(self.path)
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), self.data)
        self.assertEqual(self.lookups("failed"), 1)
        self.assertEqual(self.bucket.objects, {})

    def test_a_late_bucket_means_serving_here_after_the_deadline(self):
        """A bucket that does not answer holds the GET only until the shared level's deadline."""
        self.held()
        self.bucket.hang = True
        c = self.rig.client(self.path)
        self.assertEqual(c.raw(), b"")
        self.rig.reactor.advance(self.rig.shared.deadline)
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), self.data)

    def test_no_redirect_takes_credentials_to_the_bucket(self):
        """
        A GET with an Authorization header to a host whose subdomain the
        bucket is would take the header there (Go keeps it): it is served
        here; without the header, it is redirected.
        """
        bucket = FakeBucket("https://s3.mirror.test:9000")
        self.rig = self.make_rig(bucket)
        self.bucket = bucket
        self.held()
        self.in_bucket()
        c = self.rig.client(self.path, headers={"Authorization": "Basic dXNlcjpwYXNz"})
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), self.data)
        self.assertEqual(self.rig.client(self.path).status(), 307)

    def test_without_redirects_a_bucket_hit_is_served_here(self):
        """Redirects are off unless asked for: a held blob is served, the bucket never asked."""
        bucket = FakeBucket()
        self.rig = self.make_rig(bucket, redirect=None)
        self.bucket = bucket
        self.held()
        self.in_bucket()
        c = self.rig.client(self.path)
        self.assertEqual(c.status(), 200)
        self.assertEqual(bucket.heads, [])

    def test_a_fill_under_way_is_followed_not_redirected(self):
        """A client asking while this replica downloads the blob follows the download."""
        first = self.rig.client(self.path)
        self.confirm(len(self.data))
        self.in_bucket()
        second = self.rig.client(self.path)
        body = FedBody(headers={"Content-Length": [str(len(self.data))]})
        self.rig.upstream.answer(0, body)
        body.feed(self.data)
        body.end()
        self.assertEqual((first.status(), second.status()), (200, 200))
        self.assertEqual(second.body(), self.data)


class KeepsAuthorizationTests(SynchronousTestCase):
    def test_the_same_host_and_its_subdomains_keep_it(self):
        """As Go's net/http: the same name (whatever the port) or a subdomain keeps Authorization."""
        self.assertTrue(keeps_authorization("127.0.0.1", "127.0.0.1"))
        self.assertTrue(keeps_authorization("s3.mirror.example", "mirror.example"))
        self.assertTrue(keeps_authorization("Mirror.Example.", "mirror.example"))

    def test_other_hosts_do_not(self):
        """A parent domain, a sibling, a look-alike suffix or an IPv6 address loses it."""
        self.assertFalse(keeps_authorization("mirror.example", "s3.mirror.example"))
        self.assertFalse(keeps_authorization("s3.example", "mirror.example"))
        self.assertFalse(keeps_authorization("evilmirror.example", "mirror.example"))
        self.assertFalse(keeps_authorization("::1", "1"))
        self.assertFalse(keeps_authorization("storage.googleapis.com", "localhost"))

    def test_the_port_is_no_part_of_the_host_name(self):
        """The Host field's port is dropped; an IPv6 literal loses its brackets."""
        self.assertEqual(host_name("mirror.example:5000"), "mirror.example")
        self.assertEqual(host_name("mirror.example"), "mirror.example")
        self.assertEqual(host_name("[::1]:5000"), "::1")
