# test-case-name: tests.test_expiry
"""
The size limit: an index rebuilt from the files at start, LRU eviction in
the background, manifests never outliving the blobs they name, and nothing
evicted while it is read or written.
"""

import json
import os
import shutil
from collections import OrderedDict

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from regcache.expiry import Expiry
from regcache.index import BLOB, MANIFEST, TOUCH_EVERY, Scan
from regcache.reference import Digest
from regcache.manifests import Manifest
from regcache.store import Store
from tests.support import FedBody, Rig, blob, inline

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def cache_blob(store, data, digest):
    w = store.new_writer(digest)
    w.write(data)
    assert w.matches(len(data))
    w.commit()
    w.close()


def manifest_of(media_type, **parts) -> Manifest:
    """A manifest (or index) whose descriptors name the given (digest, size) pairs."""
    doc = {"schemaVersion": 2, "mediaType": media_type}
    for key, pairs in parts.items():
        descs = [{"mediaType": "application/octet-stream", "digest": str(d), "size": n} for d, n in pairs]
        doc[key] = descs[0] if key == "config" else descs
    body = json.dumps(doc).encode()
    return Manifest(body, media_type, Digest.of(body))


class Deferring:
    """A store runner that holds every call until the test releases it."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def run_all(self):
        while self.calls:
            self.run(0)

    def run(self, i):
        f, args, d = self.calls.pop(i)
        if True:
            try:
                result = f(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)


class Base(SynchronousTestCase):
    limit = 10_000

    def setUp(self):
        self.rig = Rig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)
        self.store = self.rig.store
        self.clock = self.rig.reactor
        self.clock.advance(1_700_000_000)
        self.expiry = Expiry(self.store, self.limit, self.clock, self.rig.metrics)
        self.expiry.startService()
        self.addCleanup(self.expiry.stopService)

    def add(self, n, size=1000, seed=b"b"):
        out = []
        for i in range(n):
            data, digest = blob(size, seed + str(i).encode())
            cache_blob(self.store, data, digest)
            self.clock.advance(1)
            out.append(digest)
        return out

    def present(self, digests):
        return [os.path.exists(self.store.blob_path(d)) for d in digests]


class EvictionTests(Base):
    def test_past_high_water_evicts_lru_to_low_water(self):
        """
        Crossing 95% of the limit evicts the least recently used entries
        until the store is under 85%; the rest stay.
        """
        digests = self.add(9)
        self.assertEqual(self.present(digests), [True] * 9)
        digests += self.add(1, seed=b"tenth")
        self.assertEqual(self.present(digests), [False, False] + [True] * 8)
        self.assertEqual(self.store.index.total, 8000)
        self.assertLessEqual(self.store.index.total, self.limit * Expiry.LOW)

    def test_eviction_removes_links_and_links_keep_nothing(self):
        """
        Links neither keep content from eviction nor outlive it: the
        evicted blobs' links files go with them, from disk and memory, and
        the blobs that stay keep theirs.
        """
        digests = self.add(9)
        for d in digests:
            self.store.link(d, ("docker.io", "library/a"))
            self.store.link(d, ("docker.io", "library/b"))
        files = [os.path.join(self.rig.root, "links", d.algorithm, d.hex[:2], d.hex) for d in digests]
        self.assertEqual([os.path.exists(f) for f in files], [True] * 9)
        self.add(1, seed=b"tenth")
        self.assertEqual(self.present(digests), [False, False] + [True] * 7)
        self.assertEqual([os.path.exists(f) for f in files], [False, False] + [True] * 7)
        known = self.store.index.links
        self.assertEqual([known.has(d, ("docker.io", "library/a")) for d in digests],
                         [False, False] + [True] * 7)

    def test_a_use_moves_an_entry_to_the_back(self):
        """
        Serving a blob makes it the most recently used: the next eviction
        takes the ones nobody asked for.
        """
        digests = self.add(9)
        fd, _ = self.store.open_blob(digests[0])
        os.close(fd)
        self.add(1, seed=b"tenth")
        self.assertEqual(self.present(digests[:3]), [True, False, False])

    def test_blob_being_read_is_not_evicted(self):
        """
        A blob a client is still reading is pinned: eviction passes it by
        even though it is the oldest entry, and the pin goes when the client
        is done.
        """
        data, digest = blob(1000, b"read")
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [b"1000"]})
        self.rig.upstream.answer(0, body)
        body.feed(data[:10])
        c.slow_down()
        body.feed(data[10:])
        body.end()
        self.assertEqual(next(self.store.index.digests()), digest)
        others = self.add(9)
        self.assertTrue(os.path.exists(self.store.blob_path(digest)))
        self.assertEqual(self.present(others[:2]), [False, False])
        c.speed_up()
        self.assertEqual(c.body(), data)
        self.assertEqual(self.store.index.pins, {})

    def test_pins_are_released_when_a_client_hangs_up(self):
        """A client that leaves mid-body leaves no pin behind."""
        data, digest = blob(1000, b"leave")
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [b"1000"]})
        self.rig.upstream.answer(0, body)
        body.feed(data[:10])
        self.assertEqual(self.store.index.pins, {digest: 1})
        c.hang_up()
        self.assertEqual(self.store.index.pins, {})

    def test_a_store_held_over_its_limit_by_pins_is_evicted_once_they_go(self):
        """
        Past the limit with every entry pinned nothing can go, and growth
        does not retry for the backoff; once the pins are gone the store is
        brought under the limit when that backoff ends, though nothing
        grows any more (every client then hits the cache): not a minute
        later at the periodic check, over its limit all the while.
        """
        data, tenth = blob(1000, b"tenth")
        digests = self.add(9)
        releases = [self.store.pin(d) for d in digests + [tenth]]
        cache_blob(self.store, data, tenth)
        self.assertEqual(self.store.index.total, 10_000)
        for release in releases:
            release()
        self.clock.advance(Expiry.BACKOFF)
        self.assertLessEqual(self.store.index.total, self.limit * Expiry.LOW)
        self.assertEqual(self.present(digests + [tenth]), [False, False] + [True] * 8)

    def test_blob_being_written_counts_but_is_never_chosen(self):
        """
        A download under way counts toward the limit with its announced
        size (up to ``Index.ahead`` past its bytes) as soon as upstream
        answers, so room is made before its bytes arrive; the download
        itself is untouchable.
        """
        digests = self.add(6)
        data, digest = blob(4000, b"big")
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [b"4000"]})
        self.rig.upstream.answer(0, body)
        self.assertEqual((self.store.index.writing, self.store.index.written), (4000, 0))
        self.assertEqual(self.present(digests), [False, False] + [True] * 4)
        body.feed(data[:3600])
        self.assertEqual((self.store.index.writing, self.store.index.written), (4000, 3600))
        body.feed(data[3600:])
        body.end()
        self.assertEqual(c.body(), data)
        self.assertTrue(os.path.exists(self.store.blob_path(digest)))
        self.assertEqual((self.store.index.writing, self.store.index.written), (0, 0))
        self.assertLessEqual(self.store.index.total, self.limit * Expiry.HIGH)

    def test_blob_larger_than_the_limit_is_refused_before_any_eviction(self):
        """
        A blob whose announced length is past the cache's limit is refused
        with a 503 that says so, before anything is evicted for it; no temp
        file or count of it is left, and the upstream response is given up.
        """
        digests = self.add(5)
        _, digest = blob(10, b"huge")
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        refused = FedBody(200, {b"Content-Length": [b"20000"]})
        self.rig.upstream.answer(0, refused)
        self.assertEqual(c.status(), 503)
        self.assertEqual(refused.transport.producerState, "stopped")
        error = json.loads(c.body())["errors"][0]
        self.assertEqual(error["code"], "UNAVAILABLE")
        self.assertIn("20000 bytes is larger than the cache limit of 10000 bytes", error["message"])
        self.assertEqual(self.present(digests), [True] * 5)
        self.assertEqual(self.rig.temp_files(), [])
        self.assertEqual((self.store.index.writing, self.store.index.written), (0, 0))

    def test_announced_length_evicts_only_a_step_ahead_of_the_bytes(self):
        """
        A download counts its announced length only ``Index.ahead`` bytes
        beyond what it wrote: an upstream that announces more than it sends
        costs at most one step of evictions, not everything evictable.
        """
        self.store.index.ahead = 1000
        digests = self.add(9)
        data, digest = blob(9000, b"liar")
        self.rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [b"9000"]})
        self.rig.upstream.answer(0, body)
        self.assertEqual((self.store.index.writing, self.store.index.written), (1000, 0))
        self.assertEqual(self.present(digests), [False, False] + [True] * 7)
        body.feed(data[:500])
        self.assertEqual((self.store.index.writing, self.store.index.written), (1500, 500))
        self.assertEqual(self.present(digests), [False, False] + [True] * 7)

    def test_blob_of_unknown_length_stops_at_the_limit(self):
        """
        A blob sent without a length fails once it passes the limit, rather
        than grow without end: its client (still waiting for the length) is
        told why, and the temp file and its count are gone.
        """
        data, digest = blob(12_000, b"endless")
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200)
        self.rig.upstream.answer(0, body)
        for i in range(0, len(data), 1000):
            body.feed(data[i:i + 1000])
            if body.transport.producerState == "stopped":
                break
        self.assertEqual(body.transport.producerState, "stopped")
        body.die()  # what stopProducing does to a real response
        self.assertEqual(c.status(), 503)
        self.assertIn(b"larger than the cache limit of 10000 bytes", c.body())
        self.assertEqual(self.rig.temp_files(), [])
        self.assertEqual((self.store.index.writing, self.store.index.written), (0, 0))

    def test_evicted_blob_is_fetched_again(self):
        """An evicted blob is a plain miss: the next request goes upstream."""
        digests = self.add(10)
        c = self.rig.client(f"/v2/library/a/blobs/{digests[0]}")
        self.assertEqual(len(self.rig.upstream.calls), 1)
        data, _ = blob(1000, b"b0")
        body = FedBody(200, {b"Content-Length": [b"1000"]})
        self.rig.upstream.answer(0, body)
        body.feed(data)
        body.end()
        self.assertEqual(c.body(), data)

    def test_eviction_is_logged_and_counted(self):
        """Each eviction says what it freed, and the metrics count it."""
        self.add(10)
        text = self.rig.client("/metrics").body().decode()
        self.assertIn('regcache_evicted_total{kind="blob"} 2.0', text)
        self.assertIn("regcache_store_bytes 8000.0", text)


    def test_the_index_gauge_says_when_the_start_up_index_is_complete(self):
        """
        regcache_store_indexed is 0 while the start-up scan runs (/readyz
        does not wait for it) and 1 once it has loaded.
        """
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        scans = []
        rig.store.scan = lambda: scans.append(Deferred()) or scans[-1]
        Expiry(rig.store, self.limit, rig.reactor, rig.metrics).startService()
        value = rig.metrics.registry.get_sample_value
        self.assertEqual(value("regcache_store_indexed"), 0)
        scans[0].callback(Scan(OrderedDict(), {}))
        self.assertEqual(value("regcache_store_indexed"), 1)


class ManifestTests(Base):
    def test_manifest_goes_before_the_blobs_it_names(self):
        """
        Evicting a layer takes every manifest that names it, and their files
        are deleted first: no manifest is ever left naming a lost blob.
        """
        layer, config = self.add(2)
        m = manifest_of(OCI_MANIFEST, config=[(config, 1000)], layers=[(layer, 1000)])
        self.store.put_manifest(m)
        self.clock.advance(1)
        chosen = self.store.index.choose(self.store.index.total - 1)
        self.assertEqual([d for d, _ in chosen], [m.digest, layer])
        self.assertEqual(chosen[0][1].kind, MANIFEST)

    def test_index_goes_before_its_children(self):
        """
        An image index, the manifest it lists, and the layer: evicting the
        layer takes all three, outermost first.
        """
        (layer,) = self.add(1)
        child = manifest_of(OCI_MANIFEST, layers=[(layer, 1000)])
        self.store.put_manifest(child)
        top = manifest_of(OCI_INDEX, manifests=[(child.digest, child.size)])
        self.store.put_manifest(top)
        chosen = self.store.index.choose(self.store.index.total - 1)
        self.assertEqual([d for d, _ in chosen], [top.digest, child.digest, layer])

    def test_evicted_manifest_is_gone_from_memory_and_disk(self):
        """
        After an eviction neither the manifest's body, its type record nor
        the in-memory copy remains, while the blobs it did not need stay.
        """
        layer, other = self.add(2)
        m = manifest_of(OCI_MANIFEST, layers=[(layer, 1000)])
        self.store.put_manifest(m)
        self.assertIsNotNone(self.successResultOf(self.store.manifest(m.digest)))
        self.clock.advance(1)
        fd, _ = self.store.open_blob(other)
        os.close(fd)
        self.add(7, seed=b"more")
        self.add(1, size=300, seed=b"small")
        self.assertIsNone(self.successResultOf(self.store.manifest(m.digest)))
        self.assertFalse(os.path.exists(self.store.blob_path(m.digest)))
        self.assertFalse(os.path.exists(self.store._path("manifests", m.digest)))
        self.assertEqual(self.present([layer, other]), [False, True])

    def test_using_a_manifest_keeps_its_blobs_fresh(self):
        """
        Serving a manifest counts as a use of the blobs it names (through
        an index too): a hot image's layers are not the oldest entries even
        if no client fetched them lately.
        """
        layer, other = self.add(2)
        child = manifest_of(OCI_MANIFEST, layers=[(layer, 1000)])
        self.store.put_manifest(child)
        top = manifest_of(OCI_INDEX, manifests=[(child.digest, child.size)])
        self.store.put_manifest(top)
        self.add(3, seed=b"newer")
        self.store.forget(top.digest)
        self.assertIsNotNone(self.successResultOf(self.store.manifest(top.digest)))
        order = list(self.store.index.digests())
        self.assertEqual(order[0], other)
        self.assertEqual(set(order[-3:]), {layer, child.digest, top.digest})

    def test_pinned_layer_keeps_its_manifest(self):
        """
        A manifest whose blob is being read is not evicted: taking the
        manifest is only ever done to take the blob.
        """
        (layer,) = self.add(1)
        m = manifest_of(OCI_MANIFEST, layers=[(layer, 1000)])
        self.store.put_manifest(m)
        release = self.store.pin(layer)
        chosen = self.store.index.choose(0)
        self.assertNotIn(layer, [d for d, _ in chosen])
        self.assertIn(m.digest, [d for d, _ in chosen])
        release()

    def test_manifest_that_was_a_blob_becomes_a_manifest(self):
        """
        Bytes first fetched as a blob and then stored as a manifest are
        indexed once, as a manifest with its references.
        """
        (layer,) = self.add(1)
        m = manifest_of(OCI_MANIFEST, layers=[(layer, 1000)])
        cache_blob(self.store, m.body, m.digest)
        self.store.put_manifest(m)
        entry = self.store.index.get(m.digest)
        self.assertEqual((entry.kind, entry.size), (MANIFEST, m.size))
        self.assertEqual(self.store.index.stored, 1000 + m.size)
        self.assertEqual(self.store.index.referrers(layer), {m.digest})


class RaceTests(Base):
    def setUp(self):
        super().setUp()
        self.runner = Deferring()
        self.store._run = self.runner

    def test_new_copy_waits_for_the_old_ones_deletion(self):
        """
        A blob fetched again while its eviction is still deleting the old
        file is committed after the deletion, so the new file survives; in
        between, the digest reads as missing.
        """
        data, digest = blob(1000, b"again")
        self.store._run = inline
        cache_blob(self.store, data, digest)
        self.store._run = self.runner
        victims = self.store.index.choose(0)
        self.store.delete(victims)
        self.assertIsNone(self.store.open_blob(digest))
        w = self.store.new_writer(digest)
        w.write(data)
        self.assertTrue(w.matches(1000))
        committed = w.commit()
        self.runner.run_all()
        self.runner.run_all()
        self.successResultOf(committed)
        w.close()
        with open(self.store.blob_path(digest), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertIn(digest, self.store.index)

    def test_refetched_blob_survives_an_eviction_of_the_bad_copy(self):
        """
        A cached blob whose file has the wrong size is fetched again; an
        eviction that runs while the new copy is being renamed into place
        cannot delete it: the bad copy left the index when it was found,
        and a blob being committed is never chosen.
        """
        data, digest = blob(3000, b"torn")
        self.store._run = inline
        cache_blob(self.store, data, digest)
        self.store._run = self.runner
        with open(self.store.blob_path(digest), "r+b") as f:
            f.truncate(1000)
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        self.assertNotIn(digest, self.store.index)
        body = FedBody(200, {b"Content-Length": [b"3000"]})
        self.rig.upstream.answer(0, body)
        body.feed(data)
        body.end()
        self.assertEqual(c.body(), data)
        self.store.delete(self.store.index.choose(0))
        self.runner.run_all()
        self.assertEqual(self.rig.blob_file(digest), data)
        self.assertEqual(self.store.index.get(digest).size, 3000)

    def test_blob_being_committed_is_not_evicted(self):
        """
        A blob whose digest is already indexed (a file being replaced) is
        not chosen for eviction while its new copy is being renamed into
        place: the deletion would otherwise remove the new file.
        """
        data, digest = blob(1000, b"replace")
        self.store._run = inline
        cache_blob(self.store, data, digest)
        self.store._run = self.runner
        w = self.store.new_writer(digest)
        w.write(data)
        self.assertTrue(w.matches(1000))
        committed = w.commit()
        self.assertNotIn(digest, [d for d, _ in self.store.index.choose(0)])
        self.runner.run_all()
        self.successResultOf(committed)
        w.close()
        self.assertEqual(self.rig.blob_file(digest), data)
        self.assertEqual(self.store.index.pins, {})

    def test_manifest_being_stored_is_not_evicted(self):
        """
        Bytes cached as a blob and now being stored as a manifest are not
        evicted while the manifest's files are written.
        """
        m = manifest_of(OCI_MANIFEST, layers=[])
        self.store._run = inline
        cache_blob(self.store, m.body, m.digest)
        self.store._run = self.runner
        stored = self.store.put_manifest(m)
        self.assertEqual(self.store.index.choose(0), [])
        self.runner.run_all()
        self.successResultOf(stored)
        self.assertEqual(self.store.index.get(m.digest).kind, MANIFEST)
        self.assertTrue(os.path.exists(self.store._path("manifests", m.digest)))
        self.assertEqual(self.store.index.pins, {})

    def test_room_pauses_a_chunk_early(self):
        """
        With the default headroom, a download pauses as soon as deletions
        are pending and less than one socket read of room is left, so the
        chunk already on its way cannot take the disk past the limit.
        """
        self.store._run = inline
        self.add(9)
        self.store._run = self.runner
        data, digest = blob(2000, b"early")
        self.rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [b"2000"]})
        self.rig.upstream.answer(0, body)
        self.assertGreater(self.store.index.deleting, 0)
        body.feed(data[:100])
        self.assertEqual(body.transport.producerState, "paused")
        self.runner.run_all()
        self.assertEqual(body.transport.producerState, "producing")

    def test_download_waits_for_deletions_rather_than_pass_the_limit(self):
        """
        While evicted files are still being deleted, a download that would
        take the disk past the limit pauses its upstream, and resumes once
        the deletion is done: the bytes on disk never exceed the limit.
        """
        self.store._run = inline
        self.add(9)
        self.store._run = self.runner
        self.store.index.headroom = 0  # exact byte boundaries below
        data, digest = blob(2000, b"fast")
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [b"2000"]})
        self.rig.upstream.answer(0, body)
        self.assertEqual(self.store.index.deleting, 3000)
        body.feed(data[:1000])
        self.assertEqual(body.transport.producerState, "producing")
        body.feed(data[1000:1500])
        self.assertEqual(body.transport.producerState, "paused")
        self.runner.run_all()
        self.assertEqual(self.store.index.deleting, 0)
        self.assertEqual(body.transport.producerState, "producing")
        body.feed(data[1500:])
        body.end()
        self.runner.run_all()
        self.assertEqual(c.body(), data)


class AccessTimeTests(Base):
    def test_use_is_persisted_at_most_every_ten_minutes(self):
        """
        A use writes the file's mtime once per TOUCH_EVERY window (the
        landing itself counts for its window); in between, uses stay in
        memory.
        """
        (digest,) = self.add(1)
        path = self.store.blob_path(digest)
        os.utime(path, (1000, 1000))
        os.close(self.store.open_blob(digest)[0])
        self.assertEqual(os.stat(path).st_mtime, 1000)
        # The start of the next window, and a second into it.
        self.clock.advance(TOUCH_EVERY - self.clock.seconds() % TOUCH_EVERY + 1)
        os.close(self.store.open_blob(digest)[0])
        first = self.clock.seconds()
        self.assertEqual(os.stat(path).st_mtime, first)
        self.clock.advance(TOUCH_EVERY / 2)
        os.close(self.store.open_blob(digest)[0])
        self.assertEqual(os.stat(path).st_mtime, first)
        self.clock.advance(TOUCH_EVERY)
        os.close(self.store.open_blob(digest)[0])
        self.assertEqual(os.stat(path).st_mtime, self.clock.seconds())


class StartupIndexTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)

    def restart(self, limit=None):
        store = Store(self.rig.root, inline, self.rig.reactor.seconds)
        store.prepare()
        expiry = Expiry(store, limit, self.rig.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        return store, expiry

    def test_index_is_rebuilt_from_the_files(self):
        """
        A fresh process knows every file's size and kind, and which
        manifest names which blob, from the files alone: no database.
        """
        layer = blob(3000, b"layer")
        cache_blob(self.rig.store, *layer)
        m = manifest_of(OCI_MANIFEST, layers=[(layer[1], 3000)])
        self.rig.store.put_manifest(m)
        store, _ = self.restart()
        index = store.index
        self.assertTrue(index.ready)
        self.assertEqual(index.get(layer[1]).size, 3000)
        self.assertEqual(index.get(layer[1]).kind, BLOB)
        self.assertEqual(index.get(m.digest).kind, MANIFEST)
        self.assertEqual(index.referrers(layer[1]), {m.digest})
        self.assertEqual(index.stored, 3000 + m.size)

    def test_lru_order_survives_a_restart(self):
        """
        The persisted access times (file mtimes) order the rebuilt index:
        the least recently used before restart is evicted first after it.
        """
        digests = []
        for i in range(10):
            data, digest = blob(1000, b"r" + bytes([i]))
            cache_blob(self.rig.store, data, digest)
            os.utime(self.rig.store.blob_path(digest), (10_000 - i, 10_000 - i))
            digests.append(digest)
        store, _ = self.restart(limit=10_000)
        self.assertEqual(list(store.index.digests()), digests[:8][::-1])
        self.assertEqual([os.path.exists(store.blob_path(d)) for d in digests], [True] * 8 + [False] * 2)

    def test_declared_size_wins_over_a_truncated_file(self):
        """
        A layer file shorter than its manifest says is treated as missing
        at serve time: the next request fetches it again.
        """
        data, digest = blob(3000, b"torn")
        cache_blob(self.rig.store, data, digest)
        self.rig.store.put_manifest(manifest_of(OCI_MANIFEST, layers=[(digest, 3000)]))
        with open(self.rig.store.blob_path(digest), "r+b") as f:
            f.truncate(1000)
        store, _ = self.restart()
        self.assertEqual(store.index.get(digest).size, 3000)
        self.assertIsNone(store.open_blob(digest))

    def test_edited_manifest_declares_nothing_at_start(self):
        """
        A manifest edited on disk to declare another size for a layer does
        not make the good layer a miss after a restart: bytes that do not
        match their digest name nothing.
        """
        data, digest = blob(3000, b"good layer")
        cache_blob(self.rig.store, data, digest)
        m = manifest_of(OCI_MANIFEST, layers=[(digest, 3000)])
        self.rig.store.put_manifest(m)
        with open(self.rig.store.blob_path(m.digest), "wb") as f:
            f.write(m.body.replace(b"3000", b"2999"))
        store, _ = self.restart()
        self.assertEqual(store.index.get(digest).size, 3000)
        fd, size = store.open_blob(digest)
        os.close(fd)
        self.assertEqual(size, 3000)

    def test_orphan_type_records_and_strays(self):
        """
        A type record with no body is not indexed, and a file whose name is
        no digest is ignored and counted; the scan deletes neither (that is
        ``regcache verify``'s job: the scan runs while requests are served).
        """
        m = manifest_of(OCI_MANIFEST, layers=[])
        self.rig.store.put_manifest(m)
        os.unlink(self.rig.store.blob_path(m.digest))
        stray = os.path.join(self.rig.root, "blobs", "sha256", "ab", "not-a-digest")
        os.makedirs(os.path.dirname(stray), exist_ok=True)
        open(stray, "wb").close()
        store = Store(self.rig.root, inline, self.rig.reactor.seconds)
        scan = self.successResultOf(store.scan())
        self.assertEqual(scan.strays, 1)
        self.assertNotIn(m.digest, scan.entries)
        self.assertTrue(os.path.exists(stray))
        self.assertTrue(os.path.exists(store._path("manifests", m.digest)))

    def test_manifest_stored_during_the_scan_keeps_its_type_record(self):
        """
        A manifest whose files land after the scan walked ``blobs/`` but
        before it walked ``manifests/`` keeps its type record: it is still
        a manifest after the scan, and after the next restart.
        """
        m = manifest_of(OCI_MANIFEST, layers=[])
        store = Store(self.rig.root, inline, self.rig.reactor.seconds)
        walk = store.walk

        def walk_then_store(kind="blobs"):
            if kind == "manifests":
                store._write_manifest(m)  # what put_manifest's thread does, meanwhile
            return walk(kind)

        store.walk = walk_then_store
        self.successResultOf(store.scan())
        self.assertTrue(os.path.exists(store._path("manifests", m.digest)))
        later, _ = self.restart()
        self.assertEqual(later.index.get(m.digest).kind, MANIFEST)

    def test_commits_during_the_scan_are_kept(self):
        """
        What lands while the start-up scan runs is merged, newest last, and
        eviction waits for the scan to finish.
        """
        old = blob(1000, b"old")
        cache_blob(self.rig.store, *old)
        store = Store(self.rig.root, Deferring(), self.rig.reactor.seconds)
        expiry = Expiry(store, 1500, self.rig.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        new = blob(1000, b"new")
        w = store.new_writer(new[1])
        w.write(new[0])
        w.commit()
        store._run.run(1)
        w.close()
        self.assertFalse(store.index.ready)
        self.assertTrue(os.path.exists(store.blob_path(old[1])))
        store._run.run_all()
        self.assertTrue(store.index.ready)
        store._run.run_all()
        self.assertEqual([os.path.exists(store.blob_path(d)) for d in (old[1], new[1])], [False, True])


class PeriodicTests(Base):
    def test_periodic_check_survives_errors(self):
        """
        An exception in the periodic job is logged and the job keeps
        running: a LoopingCall would otherwise stop for good.
        """
        def broken():
            raise RuntimeError("boom")

        self.expiry.check = broken
        self.clock.advance(Expiry.CHECK_EVERY)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.expiry._loop.running)
        self.clock.advance(Expiry.CHECK_EVERY)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failed_scan_is_retried(self):
        """A start-up scan that failed is tried again by the periodic job."""
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        attempts = []
        real = rig.store._scan

        def flaky():
            attempts.append(1)
            if len(attempts) == 1:
                raise OSError("disk hiccup")
            return real()

        rig.store._scan = flaky
        expiry = Expiry(rig.store, 1000, rig.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertFalse(rig.store.index.ready)
        rig.reactor.advance(Expiry.CHECK_EVERY)
        self.assertTrue(rig.store.index.ready)
