"""
``regcache verify``'s check of the shared bucket, against a fake bucket on
a task clock: every blob and manifest object hashed and measured, bad ones
deleted while they are still the copy that was read.
"""

import io
import os
import unittest

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from regcache.reference import Digest
from regcache.s3 import StorageError
from regcache.shared import blob_name
from regcache.sharedmeta import manifest_name
from regcache.verify_bucket import BucketCheck, object_digest
from tests.test_shared import FakeBucket


class BucketCheckTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.bucket = FakeBucket()
        self.out = io.StringIO()
        self.good = os.urandom(3000)
        self.put(blob_name(Digest.of(self.good)), self.good)

    def put(self, name, data):
        self.bucket.objects[name] = (data, "application/octet-stream", {})

    def check(self, **options):
        results = []
        d = Deferred.fromCoroutine(BucketCheck(self.bucket, self.out, self.clock, **options).run())
        d.addBoth(results.append)
        return results

    def test_good_objects_pass_and_stay(self):
        """Objects whose bytes are their names' digests are counted, kept, and no problem."""
        manifest = b'{"schemaVersion": 2}'
        self.put(manifest_name(Digest.of(manifest)), manifest)
        report = self.check()[0]
        self.assertEqual((report.checked, report.bytes, report.problems), (2, 3000 + len(manifest), 0))
        self.assertEqual(len(self.bucket.objects), 2)
        self.assertIn("bucket: checked 2 objects", self.out.getvalue())

    def test_a_corrupt_object_is_reported_and_deleted(self):
        """Bytes that are not the digest are a problem, and the object goes, so a good copy can be uploaded."""
        bad = blob_name(Digest.of(b"the real bytes"))
        self.put(bad, b"other bytes")
        report = self.check()[0]
        self.assertEqual(report.corrupt, [bad])
        self.assertNotIn(bad, self.bucket.objects)
        self.assertIn(blob_name(Digest.of(self.good)), self.bucket.objects)

    def test_an_object_replaced_meanwhile_is_left(self):
        """A delete is conditional on the ETag read: a good copy put in its place since is not removed."""
        bad = blob_name(Digest.of(b"the real bytes"))
        self.put(bad, b"other bytes")
        delete = self.bucket.delete

        async def replaced_first(name, if_match=None):
            self.put(name, b"the real bytes")
            return await delete(name, if_match)

        self.bucket.delete = replaced_first
        self.check()
        self.assertEqual(self.bucket.objects[bad][0], b"the real bytes")
        self.assertIn("replaced meanwhile", self.out.getvalue())

    def test_names_that_are_no_digest_are_strays_and_not_deleted(self):
        """An object regcache never writes under blobs/ is reported, never deleted: it may be someone else's."""
        self.put("blobs/sha256/zz/not-a-digest", b"x")
        self.put(f"blobs/sha256/00/{Digest.of(self.good).hex}", self.good)
        report = self.check()[0]
        self.assertEqual(len(report.strays), 2)
        self.assertIn("blobs/sha256/zz/not-a-digest", self.bucket.objects)

    def test_listing_goes_page_by_page(self):
        """Every page of a long listing is checked."""
        for i in range(5):
            data = os.urandom(10 + i)
            self.put(blob_name(Digest.of(data)), data)
        list_ = self.bucket.list
        self.bucket.list = lambda prefix, after=None: list_(prefix, after, limit=2)
        self.assertEqual(self.check()[0].checked, 6)

    def test_a_bucket_that_cannot_be_listed_fails_the_check(self):
        """A bucket that errs on listing is a StorageError for the command to report, not a clean pass."""
        self.bucket.failing = True
        self.assertTrue(self.check()[0].check(StorageError))

    def test_a_stalled_read_is_unreadable_not_corrupt(self):
        """An object whose body stops coming is given up after the idle time and not deleted."""
        name = blob_name(Digest.of(self.good))
        info = self.bucket._info(name)

        class Stuck:
            def deliverBody(self, protocol):
                self.transport = StringTransport()
                protocol.makeConnection(self.transport)
                self.protocol = protocol
                protocol.dataReceived(b"x")

        stuck = Stuck()

        async def open_(name, start=0):
            return info, stuck

        self.bucket.open = open_
        results = self.check(idle=30.0)
        self.clock.advance(29)
        self.assertEqual(results, [])
        self.clock.advance(1)
        self.assertEqual(stuck.transport.producerState, "stopped")
        # What the transport does once it was told to stop.
        stuck.protocol.connectionLost(Failure(ResponseFailed([])))
        self.assertEqual(results[0].unreadable, [name])
        self.assertIn("sent nothing for 30s", self.out.getvalue())
        self.assertIn(name, self.bucket.objects)

    def test_object_names_are_read_as_regcache_writes_them(self):
        """Only <kind>/<algorithm>/<first two hex>/<hex> names a digest."""
        digest = Digest.of(b"x")
        self.assertEqual(object_digest(blob_name(digest)), digest)
        self.assertEqual(object_digest(manifest_name(digest)), digest)
        self.assertIsNone(object_digest(f"blobs/sha256/{digest.hex[:2]}/{digest.hex}/extra"))
        self.assertIsNone(object_digest(f"tags/sha256/{digest.hex[:2]}/{digest.hex}"))
        self.assertIsNone(object_digest(f"blobs/md5/{digest.hex[:2]}/{digest.hex}"))


if __name__ == "__main__":
    unittest.main()
