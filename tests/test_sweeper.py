"""
The bucket's size limit (regcache.sweeper): one replica sweeps, under the
sweeper lease; least recently used blobs go first, uses recorded by any
replica count, and nothing recently used or under a download lease goes.
"""

import hashlib
import json
from datetime import datetime, timezone

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from regcache.metrics import Metrics
from regcache.reference import Digest
from regcache.s3 import Listed, ObjectInfo, StorageError
from regcache.shared import blob_name
from regcache import sweeper
from regcache.sweeper import LEASE, Sweeper, Uses, use_name

INTERVAL = 60.0


def digest(n: int) -> Digest:
    return Digest("sha256", hashlib.sha256(b"%d" % n).hexdigest())


class FakeBucket:
    """Objects in memory with S3's conditions, LastModified from the clock, and listings in pages of ``page``."""

    def __init__(self, clock, page=2):
        self.clock = clock
        self.page = page
        self.objects = {}  # name -> (body, etag, modified seconds, size)
        self.etags = 0
        self.broken = False
        self.listings = 0

    def _check(self):
        if self.broken:
            raise StorageError("the object store answered 503", 503)

    def store(self, name, body=b"", size=None):
        self.etags += 1
        self.objects[name] = (body, f'"{self.etags}"', self.clock.seconds(), len(body) if size is None else size)

    def blob(self, d: Digest, size: int):
        self.store(blob_name(d), size=size)

    async def read(self, name):
        self._check()
        if name not in self.objects:
            return None
        body, etag, _, size = self.objects[name]
        return ObjectInfo(size, etag, {}), body

    async def put(self, name, body, content_type="application/octet-stream", metadata=None, create_only=False,
                  if_match=None):
        self._check()
        if create_only and name in self.objects:
            return False
        if if_match is not None and (name not in self.objects or self.objects[name][1] != if_match):
            return False
        self.store(name, body)
        return True

    async def delete(self, name, if_match=None):
        self._check()
        self.objects.pop(name, None)
        return True

    async def list(self, prefix, after=None, limit=1000):
        self._check()
        self.listings += 1
        keys = sorted(k for k in self.objects if k.startswith(prefix) and (after is None or k > after))
        page = keys[:min(limit, self.page)]
        listed = [Listed(k, self.objects[k][3], datetime.fromtimestamp(self.objects[k][2], timezone.utc)
                         .isoformat().replace("+00:00", "Z")) for k in page]
        return listed, (page[-1] if len(keys) > len(page) else None)


class SweeperTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.bucket = FakeBucket(self.clock)
        self.metrics = Metrics()

    def sweeper(self, limit, me="a", bucket=None, **kw):
        return Sweeper(bucket or self.bucket, limit, self.clock, self.metrics, me, INTERVAL, **kw)

    def run_round(self, s):
        self.successResultOf(Deferred.fromCoroutine(s.round()))

    def blobs(self):
        return {name for name in self.bucket.objects if name.startswith("blobs/")}

    def sweeps(self, result):
        return self.metrics.shared_sweeps.labels(result)._value.get()

    def age(self, seconds=None):
        """Let time pass beyond the grace, so that what was stored so far may go."""
        self.clock.advance(seconds if seconds is not None else 3 * INTERVAL)

    def test_the_least_recently_used_go_until_the_bucket_fits(self):
        """Past the limit, the oldest blobs are evicted first, and no more than brings it under."""
        for n in range(5):
            self.bucket.blob(digest(n), 100)
            self.clock.advance(1)
        self.age()
        self.run_round(self.sweeper(limit=250))
        self.assertEqual(self.blobs(), {blob_name(digest(n)) for n in (3, 4)})
        self.assertEqual(self.metrics.shared_evicted.labels("blob")._value.get(), 3)
        self.assertEqual(self.metrics.shared_bucket_bytes._value.get(), 200)

    def test_under_the_limit_nothing_goes(self):
        """A bucket within its limit keeps everything, however old."""
        for n in range(3):
            self.bucket.blob(digest(n), 100)
        self.age()
        self.run_round(self.sweeper(limit=300))
        self.assertEqual(len(self.blobs()), 3)

    def test_a_recorded_use_keeps_an_old_blob(self):
        """
        A blob uploaded first but used since (a record written by any
        replica) outlives one uploaded later and never used again.
        """
        self.bucket.blob(digest(0), 100)
        self.clock.advance(10)
        self.bucket.blob(digest(1), 100)
        self.clock.advance(10)
        uses = Uses(self.bucket, self.clock, INTERVAL)
        uses.used(digest(0))
        self.age()
        self.run_round(self.sweeper(limit=150))
        self.assertEqual(self.blobs(), {blob_name(digest(0))})
        self.assertNotIn(use_name(digest(1)), self.bucket.objects)

    def test_nothing_used_within_the_grace_goes(self):
        """
        Recently used blobs stay even past the limit: a client may have
        just been sent to one (the grace covers a presigned URL's life).
        """
        for n in range(3):
            self.bucket.blob(digest(n), 100)
        s = self.sweeper(limit=100, redirect_expiry=900)
        self.clock.advance(2 * INTERVAL + 800)
        self.run_round(s)
        self.assertEqual(len(self.blobs()), 3)
        self.clock.advance(2 * INTERVAL)
        self.run_round(s)
        self.assertEqual(len(self.blobs()), 1)

    def test_a_blob_under_a_live_download_lease_stays(self):
        """A live lease (regcache.leases' object) keeps its blob; an expired one does not."""
        for n in range(3):
            self.bucket.blob(digest(n), 100)
        self.age()
        now = self.clock.seconds()
        for n, expires in ((0, now + 30), (1, now - 30)):
            self.bucket.store(f"leases/sha256/{digest(n).hex}",
                              json.dumps({"holder": "b", "token": "t", "expires": expires}).encode())
        self.run_round(self.sweeper(limit=100))
        self.assertEqual(self.blobs(), {blob_name(digest(0))})

    def test_one_replica_sweeps_until_it_stops_renewing(self):
        """
        Two replicas on one bucket: the first to create the sweeper lease
        sweeps, the other does not; once the holder stopped renewing and
        the lease expired, the other takes it over.
        """
        a, b = self.sweeper(limit=1000, me="a"), self.sweeper(limit=1000, me="b")
        self.run_round(a)
        self.run_round(b)
        self.assertEqual((self.sweeps("swept"), self.sweeps("not_holder")), (1, 1))
        self.clock.advance(INTERVAL)
        self.run_round(a)
        self.run_round(b)
        self.assertEqual((self.sweeps("swept"), self.sweeps("not_holder")), (2, 2))
        self.clock.advance(a.ttl + 1)
        self.run_round(b)
        self.assertEqual(self.sweeps("swept"), 3)
        self.assertEqual(json.loads(self.bucket.objects[LEASE][0])["holder"], "b")
        self.run_round(a)
        self.assertEqual(self.sweeps("not_holder"), 3)

    def test_the_listing_is_read_page_by_page(self):
        """Many pages of blobs and records are walked together: the totals and the order hold across pages."""
        for n in range(9):
            self.bucket.blob(digest(n), 10)
            self.clock.advance(1)
        uses = Uses(self.bucket, self.clock, INTERVAL)
        for n in (0, 3, 7):
            uses.used(digest(n))
        self.age()
        self.run_round(self.sweeper(limit=30))
        self.assertEqual(self.blobs(), {blob_name(digest(n)) for n in (0, 3, 7)})
        self.assertGreater(self.bucket.listings, 5)

    def test_candidates_per_sweep_are_bounded(self):
        """A sweep keeps at most MAX_EVICTIONS candidates in memory; the next sweep goes on."""
        self.patch(sweeper, "MAX_EVICTIONS", 2)
        for n in range(6):
            self.bucket.blob(digest(n), 10)
            self.clock.advance(1)
        self.age()
        s = self.sweeper(limit=10)
        self.run_round(s)
        self.assertEqual(self.blobs(), {blob_name(digest(n)) for n in range(2, 6)})
        self.clock.advance(INTERVAL)
        self.run_round(s)
        self.assertEqual(self.blobs(), {blob_name(digest(n)) for n in range(4, 6)})

    def test_records_of_blobs_gone_are_removed(self):
        """A use record whose blob is no longer in the bucket is removed, so records cannot pile up."""
        self.bucket.blob(digest(1), 10)
        uses = Uses(self.bucket, self.clock, INTERVAL)
        for n in (0, 1, 2):
            uses.used(digest(n))
        self.run_round(self.sweeper(limit=100))
        self.assertEqual({k for k in self.bucket.objects if k.startswith("uses/")}, {use_name(digest(1))})

    def test_a_failing_bucket_is_counted_and_the_loop_goes_on(self):
        """A round whose bucket fails counts as failed, and the sweeper tries again an interval later."""
        s = self.sweeper(limit=10)
        s.startService()
        self.addCleanup(s.stopService)
        self.bucket.broken = True
        self.clock.advance(INTERVAL)
        self.assertEqual(self.sweeps("failed"), 1)
        self.bucket.broken = False
        self.clock.advance(INTERVAL)
        self.assertEqual(self.sweeps("swept"), 1)


class UsesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.bucket = FakeBucket(self.clock)
        self.writes = []
        put = self.bucket.put

        async def counted(name, body, *args, **kw):
            self.writes.append(name)
            return await put(name, body, *args, **kw)

        self.bucket.put = counted
        self.uses = Uses(self.bucket, self.clock, INTERVAL)

    def test_a_use_is_recorded_once_an_interval(self):
        """Many uses of a blob within an interval write one record; the next interval, another."""
        for _ in range(5):
            self.uses.used(digest(0))
        self.assertEqual(self.writes, [use_name(digest(0))])
        self.clock.advance(INTERVAL)
        self.uses.used(digest(0))
        self.assertEqual(len(self.writes), 2)

    def test_the_table_of_recorded_uses_is_bounded(self):
        """The replica remembers at most MAX_REMEMBERED blobs' last records, the oldest forgotten first."""
        self.patch(sweeper, "MAX_REMEMBERED", 3)
        for n in range(5):
            self.uses.used(digest(n))
        self.assertEqual(len(self.uses._recorded), 3)
        self.assertNotIn(digest(0), self.uses._recorded)

    def test_a_failed_record_is_tried_again(self):
        """A record the bucket refused is not taken as written: the next use tries again."""
        self.bucket.broken = True
        self.uses.used(digest(0))
        self.bucket.broken = False
        self.uses.used(digest(0))
        self.assertIn(use_name(digest(0)), self.bucket.objects)

    def test_records_being_written_are_bounded(self):
        """Past MAX_RECORDING writes under way, a use goes unrecorded rather than queueing."""
        self.patch(sweeper, "MAX_RECORDING", 2)
        pending = []

        async def slow(name, body, *args, **kw):
            d = Deferred()
            pending.append(d)
            return await d

        self.bucket.put = slow
        for n in range(4):
            self.uses.used(digest(n))
        self.assertEqual(len(pending), 2)
        for d in pending:
            d.callback(True)
        self.uses.used(digest(3))
        self.assertEqual(len(pending), 3)
