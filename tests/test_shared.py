"""
The shared level in memory: a fake bucket, task clocks, and rigs given the
same bucket as replicas of one deployment.  regcache.shared's blob path
(bucket first, then the coordinator; upload only what this replica fetched)
and regcache.sharedmeta's manifests, tags and links.
"""

import hashlib
import os
import tempfile
import unittest
from dataclasses import replace

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from regcache.accounting import Accounting
from regcache.errors import UpstreamError
from regcache.manifests import Manifest
from regcache.metrics import Metrics
from regcache.reference import Digest
from regcache.s3 import Listed, ObjectInfo, StorageError
from regcache.shared import SharedLevel, blob_name
from regcache.sharedmeta import SharedMeta, escaped, link_name, manifest_name, tag_name
from regcache.store import Store
from regcache.tags import TagEntry, TagKey, TagMap
from tests.support import FedBody, HubRig, inline
from tests.test_hub import ALL



class _Body(FedBody):
    """A bucket object's body, sent whole as soon as it is asked for."""

    def __init__(self, data: bytes):
        super().__init__(200, {"content-length": [str(len(data))]})
        self.data = data

    def deliverBody(self, protocol):
        super().deliverBody(protocol)
        if self.data:
            self.feed(self.data)
        self.end()


class FakeBucket:
    """
    regcache.s3.S3 in memory: objects by name, with create-only writes.
    ``failing`` makes every call a StorageError, ``hanging`` makes every
    call wait for ever (for the caller's deadline), ``holding`` keeps
    writes (``holding_reads`` small reads) waiting until the test calls
    ``release``.
    """

    def __init__(self):
        self.objects = {}  # name -> (body, content type, metadata)
        self.calls = []  # (method, name)
        self.failing = False
        self.hanging = False
        self.holding = False
        self.holding_reads = False
        self.held = []

    async def _answer(self, method: str, name: str):
        self.calls.append((method, name))
        if self.hanging:
            await Deferred()
        if self.failing:
            raise StorageError(f"{method} {name}: the bucket is broken", 500)

    def _info(self, name: str) -> ObjectInfo:
        body, _, metadata = self.objects[name]
        return ObjectInfo(len(body), hashlib.md5(body).hexdigest(), dict(metadata))

    async def head(self, name):
        await self._answer("HEAD", name)
        return self._info(name) if name in self.objects else None

    async def open(self, name, start=0):
        await self._answer("GET", name)
        if name not in self.objects:
            return None
        return self._info(name), _Body(self.objects[name][0][start:])

    async def read(self, name):
        await self._answer("GET", name)
        if self.holding_reads:
            d = Deferred()
            self.held.append(d)
            await d
        if name not in self.objects:
            return None
        return self._info(name), self.objects[name][0]

    async def put(self, name, body, content_type="application/octet-stream", metadata=None, create_only=False,
                  if_match=None):
        await self._answer("PUT", name)
        if self.holding:
            d = Deferred()
            self.held.append(d)
            await d
        if create_only and name in self.objects:
            return False
        self.objects[name] = (body, content_type, metadata or {})
        return True

    async def upload(self, name, path, size, sha256, content_type, metadata=None):
        with open(path, "rb") as f:
            body = f.read()
        return await self.put(name, body, content_type, metadata, create_only=True)

    async def list(self, prefix, after=None, limit=1000):
        await self._answer("LIST", prefix)
        names = sorted(n for n in self.objects if n.startswith(prefix) and (after is None or n > after))
        page = names[:limit]
        listed = [Listed(n, len(self.objects[n][0]), "") for n in page]
        return listed, (page[-1] if len(names) > limit else None)

    async def delete(self, name, if_match=None):
        await self._answer("DELETE", name)
        if name in self.objects and if_match is not None and self._info(name).etag != if_match:
            return False
        self.objects.pop(name, None)
        return True

    def release(self):
        held, self.held = self.held, []
        for d in held:
            d.callback(None)

    def writes(self, prefix: str):
        return [name for method, name in self.calls if method == "PUT" and name.startswith(prefix)]


class FakeCoordinator:
    """A coordinator that records what it was asked, and hands out streams the test gives it."""

    def __init__(self, fetched=True):
        self.fetched = fetched
        self.sources = []
        self.released = []

    async def source(self, upstream, name, digest, look=None, start=0):
        self.sources.append((name, digest))
        return await upstream.open_blob(name, digest), self.fetched

    def fetching(self, digest):
        return False

    def release(self, digest):
        self.released.append(digest)


class FakeUpstream:
    """The upstream of a fill, as far as the shared level sees it: it only opens blobs."""

    def __init__(self):
        self.opened = []

    async def open_blob(self, name, digest):
        self.opened.append((name, digest))
        return ("upstream", name, digest)


def _metric(metrics, counter, *labels) -> float:
    return getattr(metrics, counter).labels(*labels)._value.get()


class LevelCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(Accounting(self.clock))
        self.store = Store(tempfile.mkdtemp(prefix="regcache-shared-"), inline, self.clock.seconds)
        self.store.prepare()
        self.bucket = FakeBucket()
        self.coordinator = FakeCoordinator()
        self.level = SharedLevel(self.bucket, self.store, self.metrics, self.clock, self.coordinator)
        self.upstream = FakeUpstream()
        self.data = os.urandom(1000)
        self.digest = Digest.of(self.data)

    def opened(self):
        d = Deferred.fromCoroutine(self.level.open_blob(self.upstream, "library/x", self.digest))
        results = []
        d.addBoth(results.append)
        return d, results

    def land(self):
        """The fill verified and committed the blob locally: what landed would upload."""
        path = self.store.blob_path(self.digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self.data)
        self.store.index.add(self.digest, len(self.data))
        self.level.landed(self.digest, len(self.data))


class BlobPathTests(LevelCase):
    def test_a_bucket_hit_is_read_from_the_bucket_and_not_uploaded_again(self):
        """A blob the bucket holds streams from it; the coordinator is never asked, and nothing is uploaded."""
        self.bucket.objects[blob_name(self.digest)] = (self.data, "application/octet-stream", {})
        _, results = self.opened()
        stream = results[0]
        self.assertEqual((stream.source, stream.total, stream.start), ("bucket", len(self.data), 0))
        self.assertEqual(self.coordinator.sources, [])
        self.land()
        self.assertEqual(self.bucket.writes("blobs/"), [])
        self.assertEqual(self.coordinator.released, [self.digest])
        self.assertEqual(_metric(self.metrics, "shared_lookups", "blob", "hit"), 1)

    def test_a_miss_goes_to_the_coordinator_and_what_it_fetched_is_uploaded(self):
        """A blob the bucket lacks comes from the coordinator; once it landed it is uploaded, then released."""
        _, results = self.opened()
        self.assertEqual(results, [("upstream", "library/x", self.digest)])
        self.assertEqual(self.coordinator.sources, [("library/x", self.digest)])
        self.land()
        self.assertEqual(self.bucket.objects[blob_name(self.digest)][0], self.data)
        self.assertEqual(self.coordinator.released, [self.digest])
        self.assertEqual(_metric(self.metrics, "shared_uploads", "blob", "uploaded"), 1)
        self.assertEqual(_metric(self.metrics, "shared_lookups", "blob", "miss"), 1)

    def test_a_second_look_that_finds_the_blob_is_counted_a_hit(self):
        """
        A fill that missed the bucket, then found the copy there on the
        coordinator's second look (its holder shared it and let the lease go
        meanwhile), read the bucket: that look counts too, a hit, so the
        lookups say where the bytes came from.
        """
        bucket, data, digest = self.bucket, self.data, self.digest

        class SharedMeanwhile(FakeCoordinator):
            async def source(self, upstream, name, digest_, look=None, start=0):
                bucket.objects[blob_name(digest)] = (data, "application/octet-stream", {})
                return await look(start), False

        self.level.coordinator = SharedMeanwhile()
        _, results = self.opened()
        self.assertEqual(results[0].source, "bucket")
        self.assertEqual((_metric(self.metrics, "shared_lookups", "blob", "miss"),
                          _metric(self.metrics, "shared_lookups", "blob", "hit")), (1, 1))

    def test_a_second_look_that_fails_is_counted_a_failure(self):
        """A second look the bucket errs on is a counted failure, and no stream: the coordinator goes on without it."""
        bucket, found = self.bucket, []

        class FailingMeanwhile(FakeCoordinator):
            async def source(self, upstream, name, digest, look=None, start=0):
                bucket.failing = True
                found.append(await look(start))
                return await upstream.open_blob(name, digest), True

        self.level.coordinator = FailingMeanwhile()
        self.opened()
        self.assertEqual(found, [None])
        self.assertEqual((_metric(self.metrics, "shared_lookups", "blob", "miss"),
                          _metric(self.metrics, "shared_lookups", "blob", "failed")), (1, 1))

    def test_the_lease_is_kept_until_the_upload_ended(self):
        """Released only after the upload: another replica must not fetch what is on its way up."""
        self.opened()
        self.bucket.holding = True
        self.land()
        self.assertEqual(self.coordinator.released, [])
        self.bucket.release()
        self.assertEqual(self.coordinator.released, [self.digest])

    def test_a_blob_another_replica_fetched_is_not_uploaded(self):
        """The coordinator's stream of another replica's fetch (fetched False) is that replica's to share."""
        self.coordinator.fetched = False
        self.opened()
        self.land()
        self.assertEqual(self.bucket.writes("blobs/"), [])
        self.assertEqual(self.coordinator.released, [self.digest])

    def test_a_failing_bucket_sends_the_fill_upstream(self):
        """A bucket that errs is a counted failure and the coordinator's source, never a failed fill."""
        self.bucket.failing = True
        _, results = self.opened()
        self.assertEqual(results, [("upstream", "library/x", self.digest)])
        self.assertEqual(_metric(self.metrics, "shared_lookups", "blob", "failed"), 1)

    def test_a_late_bucket_is_given_up_at_the_deadline(self):
        """A bucket that does not answer is waited for up to the deadline, then the fill goes upstream."""
        self.bucket.hanging = True
        _, results = self.opened()
        self.clock.advance(self.level.deadline - 0.1)
        self.assertEqual(results, [])
        self.clock.advance(0.2)
        self.assertEqual(results, [("upstream", "library/x", self.digest)])
        self.assertEqual(_metric(self.metrics, "shared_lookups", "blob", "failed"), 1)

    def test_a_failed_fill_releases_and_uploads_nothing(self):
        """A fill that failed gives the lease up; nothing of it is shared, even if it is landed later."""
        self.opened()
        self.level.failed(self.digest)
        self.assertEqual(self.coordinator.released, [self.digest])
        self.land()
        self.assertEqual(self.bucket.writes("blobs/"), [])

    def test_a_failed_upload_is_counted_and_still_releases(self):
        """An upload the bucket refuses only leaves the blob unshared: counted, and the lease given up."""
        self.opened()
        self.bucket.failing = True
        self.land()
        self.assertEqual(self.coordinator.released, [self.digest])
        self.assertEqual(_metric(self.metrics, "shared_uploads", "blob", "failed"), 1)

    def test_an_upload_another_replica_beat_is_present(self):
        """Create-only: a copy already in the bucket is kept, and counted as present."""
        self.opened()
        self.bucket.objects[blob_name(self.digest)] = (self.data, "application/octet-stream", {})
        self.land()
        self.assertEqual(_metric(self.metrics, "shared_uploads", "blob", "present"), 1)

    def test_a_broken_bucket_read_resumes_upstream(self):
        """A bucket read that breaks resumes from the bucket; a bucket that fails then hands over to upstream."""
        self.bucket.objects[blob_name(self.digest)] = (self.data, "application/octet-stream", {})
        _, results = self.opened()
        self.bucket.failing = True
        resumed = []
        Deferred.fromCoroutine(results[0].resume(500)).addBoth(resumed.append)
        self.assertEqual(resumed, [("upstream", "library/x", self.digest)])

    def test_a_broken_bucket_read_resumes_in_the_bucket_at_its_offset(self):
        """While the bucket answers, a resume reads it again from the byte the fill reached."""
        self.bucket.objects[blob_name(self.digest)] = (self.data, "application/octet-stream", {})
        _, results = self.opened()
        resumed = []
        Deferred.fromCoroutine(results[0].resume(500)).addBoth(resumed.append)
        self.assertEqual((resumed[0].source, resumed[0].start), ("bucket", 500))

    def test_blob_size_answers_from_the_bucket_or_says_nothing(self):
        """A HEAD's size comes from the bucket's HEAD; a miss or a failure is None, counted."""
        self.bucket.objects[blob_name(self.digest)] = (self.data, "application/octet-stream", {})
        sizes = []
        Deferred.fromCoroutine(self.level.blob_size(self.digest)).addBoth(sizes.append)
        self.bucket.failing = True
        Deferred.fromCoroutine(self.level.blob_size(self.digest)).addBoth(sizes.append)
        self.assertEqual(sizes, [len(self.data), None])
        self.assertEqual(_metric(self.metrics, "shared_lookups", "blob_head", "failed"), 1)


MANIFEST = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}'
OCI = "application/vnd.oci.image.manifest.v1+json"


class MetaCase(LevelCase):
    def setUp(self):
        super().setUp()
        self.meta = SharedMeta(self.level, max_writes=4)
        self.manifest = Manifest(MANIFEST, OCI, Digest.of(MANIFEST))

    def result(self, coroutine):
        results = []
        Deferred.fromCoroutine(coroutine).addBoth(results.append)
        self.assertEqual(len(results), 1)
        return results[0]


class SharedManifestTests(MetaCase):
    def test_a_manifest_is_shared_create_only_with_its_media_type(self):
        """The bytes go to manifests/sha256/<xx>/<hex> with the type in metadata, and read back as the manifest."""
        self.meta.put_manifest(self.manifest)
        body, _, metadata = self.bucket.objects[manifest_name(self.manifest.digest)]
        self.assertEqual((body, metadata), (MANIFEST, {"media-type": OCI}))
        self.assertEqual(self.result(self.meta.manifest(self.manifest.digest)), self.manifest)
        self.meta.put_manifest(self.manifest)
        self.assertEqual(_metric(self.metrics, "shared_uploads", "manifest", "present"), 1)

    def test_bytes_that_are_not_the_digest_are_not_served(self):
        """The bucket is not trusted: an object whose bytes do not match its name is no manifest."""
        self.bucket.objects[manifest_name(self.manifest.digest)] = (MANIFEST + b" ", OCI, {"media-type": OCI})
        self.assertIsNone(self.result(self.meta.manifest(self.manifest.digest)))
        self.assertEqual(_metric(self.metrics, "shared_lookups", "manifest", "invalid"), 1)

    def test_a_media_type_that_is_no_manifest_is_replaced_by_the_declared_one(self):
        """Metadata naming no manifest type gives way to the type the bytes declare."""
        self.bucket.objects[manifest_name(self.manifest.digest)] = (MANIFEST, "text/html", {"media-type": "text/html"})
        self.assertEqual(self.result(self.meta.manifest(self.manifest.digest)).media_type, OCI)

    def test_a_late_bucket_is_a_miss_at_the_deadline(self):
        """A manifest lookup waits no longer than the level's deadline."""
        self.bucket.hanging = True
        results = []
        Deferred.fromCoroutine(self.meta.manifest(self.manifest.digest)).addBoth(results.append)
        self.clock.advance(self.level.deadline + 0.1)
        self.assertEqual(results, [None])
        self.assertEqual(_metric(self.metrics, "shared_lookups", "manifest", "failed"), 1)


KEY = TagKey("registry-1.docker.io:443", "library/small", "1", "0f")


class SharedTagTests(MetaCase):
    def entry(self, checked=100.0):
        return TagEntry(str(self.manifest.digest), OCI, len(MANIFEST), checked)

    def test_a_tag_entry_reads_back_as_written(self):
        """A tag entry goes to tags/<registry>/<name>/<tag>/<key> and reads back whole."""
        self.clock.advance(200)
        self.meta.put_tag(KEY, self.entry())
        self.assertIn(tag_name(KEY), self.bucket.objects)
        self.assertEqual(self.result(self.meta.tag(KEY)), self.entry())

    def test_a_checked_time_ahead_of_this_clock_is_taken_as_now(self):
        """Another replica's clock running ahead cannot make a tag fresh here for longer than its window."""
        self.clock.advance(50)
        self.meta.put_tag(KEY, self.entry(checked=1000.0))
        self.assertEqual(self.result(self.meta.tag(KEY)).checked, 50.0)

    def test_an_object_that_is_no_tag_entry_is_ignored(self):
        """Garbage under a tag's name is counted and read as no entry."""
        self.bucket.objects[tag_name(KEY)] = (b"{not json", "application/json", {})
        self.assertIsNone(self.result(self.meta.tag(KEY)))
        self.assertEqual(_metric(self.metrics, "shared_lookups", "tag", "invalid"), 1)

    def test_one_write_per_tag_at_a_time_the_newest_next(self):
        """While a tag's write is in flight, the newest of those after it waits, the ones between are skipped."""
        self.bucket.holding = True
        for checked in (1.0, 2.0, 3.0):
            self.meta.put_tag(KEY, self.entry(checked))
        self.assertEqual(len(self.bucket.writes("tags/")), 1)
        self.bucket.release()
        self.assertEqual(len(self.bucket.writes("tags/")), 2)
        self.bucket.release()
        self.assertEqual(TagEntry.from_json(self.bucket.objects[tag_name(KEY)][0]).checked, 3.0)
        self.assertEqual(len(self.bucket.writes("tags/")), 2)

    def test_writes_under_way_are_bounded(self):
        """Past max_writes in flight, a write is dropped and counted, never queued without end."""
        self.bucket.holding = True
        for i in range(6):
            self.meta.put_tag(replace(KEY, tag=str(i)), self.entry())
        self.assertEqual(len(self.bucket.writes("tags/")), 4)
        self.assertEqual(_metric(self.metrics, "shared_uploads", "tag", "dropped"), 2)
        self.bucket.release()
        self.meta.put_tag(replace(KEY, tag="late"), self.entry())
        self.assertEqual(len(self.bucket.writes("tags/")), 5)

    def test_a_failed_write_is_counted_and_the_next_one_runs(self):
        """A write the bucket refuses is counted and logged; the object's next write is not held up by it."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.bucket.failing = True
        self.meta.put_tag(KEY, self.entry(1.0))
        self.assertEqual(_metric(self.metrics, "shared_uploads", "tag", "failed"), 1)
        self.assertTrue(any("Could not share" in e.get("log_format", "") for e in logged))
        self.bucket.failing = False
        self.meta.put_tag(KEY, self.entry(2.0))
        self.assertEqual(_metric(self.metrics, "shared_uploads", "tag", "uploaded"), 1)


class AdoptTests(unittest.TestCase):
    def setUp(self):
        root = tempfile.mkdtemp(prefix="regcache-tags-")
        self.store = Store(root, inline, lambda: 0.0)
        self.store.prepare()
        self.shared = []
        tags_shared = type("Shared", (), {"put_tag": lambda _, key, entry: self.shared.append((key, entry))})()
        self.tags = TagMap(root, inline, self.store.index, shared=tags_shared)
        self.entry = TagEntry("sha256:" + "a" * 64, OCI, 10, 100.0)

    def test_an_entry_from_the_bucket_never_replaces_a_newer_one(self):
        """An older (or as old) bucket entry leaves memory's own; a newer one replaces it, and is not shared back."""
        self.tags.put(KEY, self.entry)
        self.assertEqual(self.tags.adopt(KEY, replace(self.entry, digest="sha256:" + "b" * 64, checked=50.0)),
                         self.entry)
        newer = replace(self.entry, digest="sha256:" + "c" * 64, checked=150.0)
        self.assertEqual(self.tags.adopt(KEY, newer), newer)
        self.assertEqual(self.tags.cached(KEY), newer)
        self.assertEqual(self.shared, [(KEY, self.entry)])

    def test_a_check_found_unchanged_is_shared_as_often_as_written_down(self):
        """touch shares an entry only when it writes it down (TOUCH_EVERY), not at every revalidation."""
        kept = self.tags.put(KEY, self.entry)
        self.tags.touch(KEY, kept, 110.0)
        self.assertEqual(len(self.shared), 1)
        self.tags.touch(KEY, kept, 100.0 + 301)
        self.assertEqual(len(self.shared), 2)


class SharedLinkTests(MetaCase):
    def test_a_link_is_an_empty_object_read_back(self):
        """links/sha256/<hex>/<registry>/<name>: written create-only, then the bucket says the repository holds it."""
        key = ("docker.io", "library/small")
        self.assertFalse(self.result(self.meta.linked(self.digest, key)))
        self.meta.link(self.digest, key)
        self.assertEqual(self.bucket.objects[link_name(self.digest, key)][0], b"")
        self.assertTrue(self.result(self.meta.linked(self.digest, key)))
        self.assertFalse(self.result(self.meta.linked(self.digest, ("docker.io", "library/other"))))

    def test_a_link_known_to_be_in_the_bucket_is_not_written_again(self):
        """A link read from the bucket, or written once, costs no more writes when linked again."""
        key = ("docker.io", "library/small")
        self.bucket.objects[link_name(self.digest, key)] = (b"", "", {})
        self.result(self.meta.linked(self.digest, key))
        self.meta.link(self.digest, key)
        other = ("docker.io", "library/other")
        self.meta.link(self.digest, other)
        self.meta.link(self.digest, other)
        self.assertEqual(self.bucket.writes("links/"), [link_name(self.digest, other)])

    def test_a_link_that_failed_to_be_written_is_tried_again(self):
        """A failed link write is not taken as known: the next link of it writes it."""
        key = ("docker.io", "library/small")
        self.bucket.failing = True
        self.meta.link(self.digest, key)
        self.bucket.failing = False
        self.meta.link(self.digest, key)
        self.assertIn(link_name(self.digest, key), self.bucket.objects)

    def test_names_are_escaped_one_to_one(self):
        """Registry names with ports, brackets or underscores make distinct keys in a safe alphabet."""
        names = ["127.0.0.1:5000", "[::1]:5000", "a_3a", "a:", "docker.io"]
        escapes = [escaped(n) for n in names]
        self.assertEqual(len(set(escapes)), len(names))
        for e in escapes:
            self.assertRegex(e, r"^[A-Za-z0-9._-]+$")


class ReplicaTests(unittest.TestCase):
    """Two rigs sharing one bucket: A fetched from its fake Hub, B has a fake Hub of its own to fail or count."""

    def setUp(self):
        self.bucket = FakeBucket()
        self.a = HubRig(bucket=self.bucket)
        self.b = HubRig(bucket=self.bucket, max_stale=300)

    def pull(self, rig, path):
        return rig.get(path, headers={"Accept": ALL})

    def test_b_serves_a_tag_a_checked_within_the_window_without_asking(self):
        """A tag fresh in the bucket is served by B with no upstream request, manifest and blobs from the bucket."""
        self.assertEqual(self.pull(self.a, "/v2/library/small/manifests/1").status(), 200)
        image = self.a.images["library/small:1"]
        for b in image.blobs():
            self.assertEqual(self.a.get(f"/v2/library/small/blobs/{b.digest}").status(), 200)
        c = self.pull(self.b, "/v2/library/small/manifests/1")
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "hit"))
        self.assertEqual(c.body(), image.manifest)
        for b in image.blobs():
            c = self.b.get(f"/v2/library/small/blobs/{b.digest}")
            self.assertEqual(c.body(), b.read_bytes())
        self.assertEqual(len(self.b.hub.requests), 0)

    def test_b_revalidates_a_tag_older_than_the_window(self):
        """Past the window, the bucket's tag is revalidated with a HEAD, as a local one would be."""
        self.pull(self.a, "/v2/library/small/manifests/1")
        self.b.reactor.advance(self.a.reactor.seconds() + 61)
        c = self.pull(self.b, "/v2/library/small/manifests/1")
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "revalidated"))
        self.assertEqual(self.b.stats()["manifest_gets_total"], 0)

    def test_b_serves_a_bucket_tag_stale_while_upstream_fails(self):
        """An old bucket tag, with B's upstream failing, is served stale, its manifest from the bucket."""
        self.pull(self.a, "/v2/library/small/manifests/1")
        self.b.hub.fault("status", scope="all", status=503)
        self.b.reactor.advance(61)
        c = self.pull(self.b, "/v2/library/small/manifests/1")
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "stale"))
        self.assertEqual(c.body(), self.a.images["library/small:1"].manifest)

    def test_max_stale_bounds_a_bucket_tag_too(self):
        """A bucket tag older than --max-stale is not served while upstream fails."""
        self.pull(self.a, "/v2/library/small/manifests/1")
        self.b.hub.fault("status", scope="all", status=503)
        self.b.reactor.advance(301)
        c = self.b.client("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.b.pass_time(30)
        self.assertEqual(c.status(), 503)

    def test_b_serves_a_manifest_by_digest_from_the_bucket_with_upstream_failing(self):
        """A digest only A fetched is served by B from the bucket, linked by the bucket's link: upstream is not asked."""
        image = self.a.images["library/small:1"]
        self.pull(self.a, f"/v2/library/small/manifests/{image.digest}")
        self.b.hub.fault("status", scope="all", status=503)
        c = self.pull(self.b, f"/v2/library/small/manifests/{image.digest}")
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "shared"))
        self.assertEqual(len(self.b.hub.requests), 0)

    def test_clients_asking_at_once_share_one_look_into_the_bucket(self):
        """Concurrent requests for a manifest B lacks make one bucket GET of it, and of its link."""
        image = self.a.images["library/small:1"]
        self.pull(self.a, f"/v2/library/small/manifests/{image.digest}")
        self.bucket.calls.clear()
        self.bucket.holding_reads = True
        path = f"/v2/library/small/manifests/{image.digest}"
        clients = [self.b.client(path, headers={"Accept": ALL}) for _ in range(3)]
        self.b.settle()
        while self.bucket.held:
            self.bucket.release()
            self.b.settle()
        self.assertEqual([c.status() for c in clients], [200] * 3)
        digest = Digest.parse(image.digest)
        reads = [name for method, name in self.bucket.calls if method == "GET"]
        self.assertEqual(reads.count(manifest_name(digest)), 1)
        self.assertEqual(reads.count(link_name(digest, ("docker.io", "library/small"))), 1)

    def test_a_bucket_link_does_not_open_another_repository(self):
        """A manifest in the bucket for one repository is not served under another without upstream's word."""
        image = self.a.images["library/small:1"]
        self.pull(self.a, f"/v2/library/small/manifests/{image.digest}")
        c = self.pull(self.b, f"/v2/library/multi/manifests/{image.digest}")
        self.assertEqual(c.status(), 404)
        self.assertEqual(self.b.stats()["manifest_gets_total"], 0)

    def test_a_corrupt_bucket_manifest_is_fetched_from_upstream(self):
        """Bytes in the bucket that are not the digest are ignored: B fetches the manifest from upstream."""
        image = self.a.images["library/small:1"]
        name = manifest_name(Digest.parse(image.digest))
        self.bucket.objects[name] = (b"{}", OCI, {"media-type": OCI})
        self.bucket.objects[link_name(Digest.parse(image.digest), ("docker.io", "library/small"))] = (b"", "", {})
        c = self.pull(self.b, f"/v2/library/small/manifests/{image.digest}")
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "miss"))
        self.assertEqual(c.body(), image.manifest)


if __name__ == "__main__":
    unittest.main()
