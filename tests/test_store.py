# test-case-name: tests.test_store
"""
The store's promises under stress: a full disk, leftovers of a crash, and
files that no longer match what was recorded for them.
"""

import errno
import io
import os
import shutil

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from regcache.expiry import Expiry
from regcache.store import RECHECK, Store
from regcache.reference import Digest
from regcache.verify import main as verify_main
from tests.support import FedBody, HubRig, Rig, blob, fill_up, inline, small_filesystem
from tests.test_expiry import OCI_MANIFEST, Deferring, cache_blob, manifest_of

KiB = 1024


class DiskFullTests(SynchronousTestCase):
    """
    On a 256 KiB tmpfs mounted by the test (as root; skipped otherwise).
    """

    def setUp(self):
        fs = small_filesystem("256k")
        self.root = fs.__enter__()
        self.addCleanup(fs.__exit__, None, None, None)
        self.rig = Rig(root=self.root)
        self.store = self.rig.store
        self.expiry = Expiry(self.store, None, self.rig.reactor)
        self.expiry.startService()
        self.addCleanup(self.expiry.stopService)

    def fetch(self, data, digest):
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        body = FedBody(200, {b"Content-Length": [str(len(data)).encode()]})
        self.rig.upstream.answer(len(self.rig.upstream.calls) - 1, body)
        for i in range(0, len(data), 16 * KiB):
            body.feed(data[i:i + 16 * KiB])
            if body.protocol.fill.failure is not None:
                break
        else:
            body.end()
        return c

    def test_enospc_during_a_fill(self):
        """
        A download that runs out of space aborts its client (never a clean
        short body), leaves no temp file, evicts the least recently used
        entries, and the same blob then fetches fine.
        """
        old = [blob(64 * KiB, b"old" + bytes([i])) for i in range(3)]
        for data, digest in old:
            self.assertEqual(self.fetch(data, digest).body(), data)
        big, big_digest = blob(96 * KiB, b"big")
        c = self.fetch(big, big_digest)
        self.assertTrue(c.aborted())
        self.assertLess(len(c.body()), len(big))
        self.assertEqual(self.rig.temp_files(), [])
        self.assertIsNotNone(self.expiry.learned)
        self.assertFalse(os.path.exists(self.store.blob_path(old[0][1])))
        again = self.fetch(big, big_digest)
        self.assertEqual(again.body(), big)
        self.assertFalse(again.aborted())
        self.assertEqual(self.rig.blob_file(big_digest), big)
        self.flushLoggedErrors()

    def restart_expiry(self, max_size):
        self.expiry.stopService()
        self.expiry = Expiry(self.store, max_size, self.rig.reactor)
        self.expiry.startService()
        self.addCleanup(self.expiry.stopService)

    def refused(self, data, digest):
        """Whether the cache refuses ``data`` as larger than its limit."""
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        self.rig.upstream.answer(len(self.rig.upstream.calls) - 1,
                                 FedBody(200, {b"Content-Length": [str(len(data)).encode()]}))
        return c.status() == 503 and b"larger than the cache limit" in c.body()

    def hit_a_full_disk(self):
        """Fill the disk and fail a download on it; returns the filler file."""
        fill_up(self.root)
        data, digest = blob(64 * KiB, b"no room")
        self.assertTrue(self.fetch(data, digest).aborted())
        self.assertTrue(self.refused(data, digest))
        self.flushLoggedErrors()
        return os.path.join(self.root, "filler")

    def test_learned_limit_rises_when_space_comes_back(self):
        """
        The limit learned from a full disk is not kept for good: once the
        disk has room again, the periodic check raises it to what the disk
        can take, and blobs larger than the learned limit are cached again.
        """
        os.unlink(self.hit_a_full_disk())
        self.rig.reactor.advance(Expiry.CHECK_EVERY)
        self.assertGreater(self.expiry.limit, 200 * KiB)
        data, digest = blob(96 * KiB, b"room again")
        c = self.fetch(data, digest)
        self.assertEqual(c.body(), data)
        self.assertFalse(c.aborted())
        self.assertEqual(self.rig.blob_file(digest), data)

    def test_configured_limit_returns_when_the_disk_can_take_it(self):
        """
        With --max-size, the learned limit goes altogether once the disk
        has room for the configured one again.
        """
        self.restart_expiry(128 * KiB)
        os.unlink(self.hit_a_full_disk())
        self.assertLess(self.expiry.limit, 128 * KiB)
        self.rig.reactor.advance(Expiry.CHECK_EVERY)
        self.assertIsNone(self.expiry.learned)
        self.assertEqual(self.expiry.limit, 128 * KiB)

    def test_enospc_storing_a_manifest_still_answers(self):
        """
        A manifest the full disk cannot take is still handed back from
        memory; nothing fails, and nothing half-written is left.
        """
        m = manifest_of(OCI_MANIFEST, layers=[])
        fill_up(self.root)
        self.successResultOf(self.store.put_manifest(m))
        self.assertEqual(self.successResultOf(self.store.manifest(m.digest)), m)
        self.assertFalse(os.path.exists(self.store.blob_path(m.digest)))
        self.assertEqual(self.rig.temp_files(), [])


    def test_enospc_writing_a_tag_entry_keeps_it_in_memory(self):
        """
        A tag entry the full disk cannot take is kept in memory: the tag
        check that made it does not fail, and no temp file is left.
        """
        from regcache.tags import TagEntry, TagKey, TagMap

        tags = TagMap(self.root, inline, self.store.index)
        key = TagKey("up", "library/a", "1", "k")
        fill_up(self.root)
        tags.put(key, TagEntry("sha256:" + "a" * 64, OCI_MANIFEST, 10, 0.0))
        self.assertEqual(self.successResultOf(tags.get(key)).size, 10)
        self.assertEqual(self.rig.temp_files(), [])


    def test_manifest_pull_on_a_full_disk_still_answers(self):
        """
        A tag pulled through the whole mirror while the disk is full is
        answered with the manifest's exact bytes from memory.
        """
        hub = HubRig(root=self.root)
        image = hub.images["library/small:1"]
        fill_up(self.root)
        c = hub.client("/v2/library/small/manifests/1", headers={"Accept": image.media_type})
        hub.settle()
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), image.manifest)
        self.assertFalse(os.path.exists(hub.store.blob_path(Digest.parse(image.digest))))
        self.flushLoggedErrors()


    def test_start_on_a_full_disk(self):
        """A disk already full at start-up does not stop the server from starting."""
        fill_up(self.root)
        store = Store(self.root, inline, self.rig.reactor.seconds)
        self.assertEqual(store.prepare(), 0)


class CrashLeftoverTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)

    def test_temp_files_are_removed_at_start(self):
        """
        A download cut short by a crash leaves a temp file; the next start
        removes it, and nothing of it is visible under blobs/.
        """
        data, digest = blob(5000, b"cut")
        w = self.rig.store.new_writer(digest)
        w.write(data[:3000])
        store = Store(self.rig.root, inline, self.rig.reactor.seconds)
        self.assertEqual(store.prepare(), 1)
        self.assertEqual(self.rig.temp_files(), [])
        self.assertIsNone(store.open_blob(digest))

    def test_file_changed_under_a_running_server_is_a_miss(self):
        """
        A cached blob whose file no longer has the size it was committed
        with is treated as missing and fetched again.
        """
        data, digest = blob(5000, b"shrunk")
        cache_blob(self.rig.store, data, digest)
        with open(self.rig.store.blob_path(digest), "r+b") as f:
            f.truncate(100)
        c = self.rig.client(f"/v2/library/a/blobs/{digest}")
        self.assertEqual(len(self.rig.upstream.calls), 1)
        body = FedBody(200, {b"Content-Length": [b"5000"]})
        self.rig.upstream.answer(0, body)
        body.feed(data)
        body.end()
        self.assertEqual(c.body(), data)
        self.assertEqual(self.rig.blob_file(digest), data)

    def test_file_deleted_under_a_running_server_is_a_miss(self):
        """
        A file removed behind the server's back (by ``verify``, or by hand)
        drops out of the index and is fetched again on the next request.
        """
        data, digest = blob(5000, b"gone")
        cache_blob(self.rig.store, data, digest)
        os.unlink(self.rig.store.blob_path(digest))
        self.assertIsNone(self.rig.store.open_blob(digest))
        self.assertNotIn(digest, self.rig.store.index)

    def test_manifest_body_lands_before_its_type_record(self):
        """
        The body is written before the type record, so a type record
        always has its body even if a crash stops the store in between.
        """
        m = manifest_of(OCI_MANIFEST, layers=[])
        order = []
        real = self.rig.store._write_atomic

        def spy(final, data):
            order.append(os.path.relpath(final, self.rig.root).split(os.sep)[0])
            real(final, data)

        self.rig.store._write_atomic = spy
        self.rig.store.put_manifest(m)
        self.assertEqual(order, ["blobs", "manifests"])


def edit(path):
    """Change one byte of a file in place, as a disk that rots or a hand edit would."""
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        c = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(b" " if c != b" " else b"\t")


class ManifestReadTests(SynchronousTestCase):
    """
    Manifests read from disk are read in the store's thread runner and
    checked against their digest; the in-memory copy is trusted only while
    its file is still the one it was read from.
    """

    def setUp(self):
        self.rig = Rig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)
        self.store = self.rig.store
        self.m = manifest_of(OCI_MANIFEST, layers=[])
        self.successResultOf(self.store.put_manifest(self.m))

    def restart(self, run=inline):
        store = Store(self.rig.root, run, self.rig.reactor.seconds)
        store.prepare()
        return store

    def test_manifest_is_read_in_the_thread_runner(self):
        """
        Loading a manifest from disk waits for the runner: no read happens
        on the reactor.
        """
        runner = Deferring()
        store = self.restart(runner)
        loaded = store.manifest(self.m.digest)
        self.assertNoResult(loaded)
        runner.run_all()
        self.assertEqual(self.successResultOf(loaded), self.m)

    def test_manifest_edited_on_disk_is_missing_and_removed(self):
        """
        After a restart, a manifest whose bytes no longer match its digest
        is never handed out: it reads as missing, and its files go.
        """
        edit(self.store.blob_path(self.m.digest))
        store = self.restart()
        self.assertIsNone(self.successResultOf(store.manifest(self.m.digest)))
        self.assertFalse(os.path.exists(store.blob_path(self.m.digest)))
        self.assertFalse(os.path.exists(store._path("manifests", self.m.digest)))
        self.flushLoggedErrors()

    def test_memory_copy_goes_with_its_file(self):
        """
        A manifest held in memory reads as missing once its file was
        removed behind the server's back (``regcache verify``, by hand),
        as soon as RECHECK has passed.
        """
        self.assertEqual(self.successResultOf(self.store.manifest(self.m.digest)), self.m)
        os.unlink(self.store._path("manifests", self.m.digest))
        os.unlink(self.store.blob_path(self.m.digest))
        self.rig.reactor.advance(RECHECK)
        self.assertIsNone(self.successResultOf(self.store.manifest(self.m.digest)))
        self.assertNotIn(self.m.digest, self.store.index)

    def test_memory_copy_costs_one_look_at_its_file_a_recheck(self):
        """
        A manifest served from memory costs the runner one look at its file
        per RECHECK seconds, however many requests come in between: a hot
        manifest is not a thread round trip per request.
        """
        self.successResultOf(self.store.manifest(self.m.digest))
        looks = []
        run = self.store._run
        self.store._run = lambda f, *args: (looks.append(f.__name__), run(f, *args))[1]
        for _ in range(100):
            self.assertEqual(self.successResultOf(self.store.manifest(self.m.digest)), self.m)
        self.assertEqual(looks.count("_read_manifest"), 0)
        self.rig.reactor.advance(RECHECK)
        for _ in range(100):
            self.assertEqual(self.successResultOf(self.store.manifest(self.m.digest)), self.m)
        self.assertEqual(looks.count("_read_manifest"), 1)

    def test_memory_copy_of_an_edited_file_is_checked_again(self):
        """
        A manifest held in memory whose file was changed in place is read
        and checked again, and found bad: it reads as missing.
        """
        self.assertEqual(self.successResultOf(self.store.manifest(self.m.digest)), self.m)
        path = self.store.blob_path(self.m.digest)
        edit(path)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        self.rig.reactor.advance(RECHECK)
        self.assertIsNone(self.successResultOf(self.store.manifest(self.m.digest)))
        self.assertFalse(os.path.exists(path))

    def test_memory_keeps_the_manifests_used_lately(self):
        """
        Memory holds manifests up to a byte limit and lets the least
        recently used go first, not the oldest stored.
        """
        store = self.restart()
        a, b, c = (manifest_of(OCI_MANIFEST, layers=[(blob(10, n)[1], 10)]) for n in (b"a", b"b", b"c"))
        store.memory_limit = 2 * a.size + a.size // 2
        run = store._run

        def no_disk(f, *args):
            if f == store._write_manifest:
                return fail(OSError(errno.EIO, "I/O error"))
            return run(f, *args)

        store._run = no_disk
        store.put_manifest(a)
        store.put_manifest(b)
        self.assertEqual(self.successResultOf(store.manifest(a.digest)), a)
        store.put_manifest(c)
        self.assertEqual(self.successResultOf(store.manifest(a.digest)), a)
        self.assertIsNone(self.successResultOf(store.manifest(b.digest)))
        self.assertEqual(self.successResultOf(store.manifest(c.digest)), c)

    def test_has_manifest_from_memory(self):
        """
        ``has_manifest`` answers from the index and memory: a manifest it
        holds, not a blob or an unknown digest; and before the start-up
        index is loaded, a digest it cannot rule out.
        """
        layer = blob(100, b"layer")
        cache_blob(self.store, *layer)
        self.store.index.ready = True
        self.assertTrue(self.store.has_manifest(self.m.digest))
        self.assertFalse(self.store.has_manifest(layer[1]))
        self.assertFalse(self.store.has_manifest(blob(1, b"unknown")[1]))
        victims = [d for d, _ in self.store.index.choose(0)]
        self.assertIn(self.m.digest, victims)
        self.store.forget(self.m.digest)
        self.assertFalse(self.store.has_manifest(self.m.digest))
        fresh = self.restart()
        self.assertTrue(fresh.has_manifest(self.m.digest))


class ManifestThroughTheMirrorTests(SynchronousTestCase):
    """
    The mirror never serves a manifest's edited bytes, and notices a
    manifest that ``regcache verify`` removed while it ran.
    """

    def setUp(self):
        self.hub = HubRig()
        self.addCleanup(shutil.rmtree, self.hub.root, True)
        self.image = self.hub.images["library/small:1"]
        self.digest = Digest.parse(self.image.digest)
        self.accept = {"Accept": self.image.media_type}

    def pull(self, hub, reference):
        c = hub.get(f"/v2/library/small/manifests/{reference}", headers=self.accept)
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Docker-Content-Digest"), self.image.digest)
        self.assertEqual(c.body(), self.image.manifest)

    def test_edited_manifest_is_fetched_again_after_a_restart(self):
        """
        A manifest edited on disk while regcache was down is not served by
        tag nor by digest: it is fetched again, and the good bytes stored.
        """
        self.pull(self.hub, "1")
        edit(self.hub.store.blob_path(self.digest))
        again = HubRig(root=self.hub.root)
        self.pull(again, "1")
        self.pull(again, self.image.digest)
        self.assertEqual(again.stats()["manifest_gets_total"], 1)
        self.assertEqual(again.blob_file(self.digest), self.image.manifest)

    def test_manifest_removed_by_verify_is_fetched_again(self):
        """
        ``regcache verify`` beside the running mirror removes a manifest
        that rotted on disk; within RECHECK the mirror stops serving its
        memory copy and stores the manifest again.
        """
        self.pull(self.hub, self.image.digest)
        gets = self.hub.stats()["manifest_gets_total"]
        edit(self.hub.store.blob_path(self.digest))
        self.assertEqual(verify_main(["--storage", self.hub.root], environ={}, out=io.StringIO()), 1)
        self.hub.reactor.advance(RECHECK)
        self.pull(self.hub, self.image.digest)
        self.assertEqual(self.hub.stats()["manifest_gets_total"], gets + 1)
        self.assertEqual(self.hub.blob_file(self.digest), self.image.manifest)
        self.assertTrue(os.path.exists(self.hub.store._path("manifests", self.digest)))


class OddLayoutTests(SynchronousTestCase):
    """
    Whatever sits where a blob's file belongs (a hand edit, a bad restore),
    the blob reads as missing and is fetched again; never a 500.
    """

    def setUp(self):
        self.rig = Rig()
        self.data, self.digest = blob(4096, b"odd")
        self.path = self.rig.store.blob_path(self.digest)

    def pull(self):
        c = self.rig.client(f"/v2/library/app/blobs/{self.digest}")
        self.assertEqual(len(self.rig.upstream.calls), 1)
        body = FedBody(200, {b"Content-Length": [str(len(self.data)).encode()]})
        self.rig.upstream.answer(0, body)
        body.feed(self.data)
        body.end()
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), self.data)

    def test_a_file_where_its_directory_belongs(self):
        """A regular file in place of the blob's directory: a miss."""
        os.makedirs(os.path.dirname(os.path.dirname(self.path)), exist_ok=True)
        with open(os.path.dirname(self.path), "wb") as f:
            f.write(b"not a directory")
        self.pull()

    def test_a_directory_where_its_file_belongs(self):
        """A directory in place of the blob's file: a miss, not bytes of a directory."""
        os.makedirs(self.path)
        self.pull()
