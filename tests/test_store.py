# test-case-name: tests.test_store
"""
The store's promises under stress: a full disk, leftovers of a crash, and
files that no longer match what was recorded for them.
"""

import os
import shutil

from twisted.trial.unittest import SynchronousTestCase

from regcache.expiry import Expiry
from regcache.store import Store
from regcache.reference import Digest
from tests.support import FedBody, HubRig, Rig, blob, fill_up, inline, small_filesystem
from tests.test_expiry import OCI_MANIFEST, cache_blob, manifest_of

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

    def test_enospc_storing_a_manifest_still_answers(self):
        """
        A manifest the full disk cannot take is still handed back from
        memory; nothing fails, and nothing half-written is left.
        """
        m = manifest_of(OCI_MANIFEST, layers=[])
        fill_up(self.root)
        self.successResultOf(self.store.put_manifest(m))
        self.assertEqual(self.store.manifest(m.digest), m)
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
