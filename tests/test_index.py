"""
The index at scale: what the start-up scan hands over and what load()
keeps of what the reactor learned meanwhile, links read from their files
when asked, and eviction in batches per reactor turn.
"""

import os
import shutil

from twisted.trial.unittest import SynchronousTestCase

from regcache import links
from regcache.expiry import Expiry
from regcache.index import BLOB, MANIFEST
from regcache.store import Store
from tests.support import Rig, blob, inline
from tests.test_expiry import OCI_MANIFEST, Deferring, cache_blob, manifest_of


class ScanMergeTests(SynchronousTestCase):
    """A scan that ran while the reactor served requests, loaded."""

    def setUp(self):
        self.rig = Rig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)
        self.layers = []
        for i in range(4):
            data, digest = blob(1000, b"scan" + bytes([i]))
            cache_blob(self.rig.store, data, digest)
            os.utime(self.rig.store.blob_path(digest), (1000 + i, 1000 + i))
            self.layers.append(digest)
        self.image = manifest_of(OCI_MANIFEST, layers=[(self.layers[0], 1000)])
        self.rig.store.put_manifest(self.image)
        os.utime(self.rig.store.blob_path(self.image.digest), (900, 900))
        # A new process whose scan is done but not yet handed to the reactor.
        self.runner = Deferring()
        self.store = Store(self.rig.root, self.runner, self.rig.reactor.seconds)
        self.store.prepare()
        self.expiry = Expiry(self.store, None, self.rig.reactor)
        self.expiry.startService()
        self.addCleanup(self.expiry.stopService)
        (scan,) = [c for c in self.runner.calls if c[0] == self.store._scan]
        self.scan = scan
        self.runner.calls.remove(scan)
        self.found = self.store._scan()

    def load(self):
        self.scan[2].callback(self.found)
        self.assertTrue(self.store.index.ready)

    def test_the_scan_is_in_the_index_form_and_in_lru_order(self):
        """What the thread built is adopted as it is: sizes, kinds, references, mtime order."""
        self.load()
        index = self.store.index
        self.assertEqual(list(index.digests()), [self.image.digest] + self.layers)
        self.assertEqual(index.get(self.image.digest).kind, MANIFEST)
        self.assertEqual(index.get(self.layers[0]), (1000, BLOB))
        self.assertEqual(index.referrers(self.layers[0]), {self.image.digest})
        self.assertEqual(index.stored, 4000 + self.image.size)

    def test_an_entry_removed_during_the_scan_does_not_come_back(self):
        """
        A file the reactor found gone (or discarded) after the scan saw it
        stays out of the index, with its references: the scan's copy is older.
        """
        os.unlink(self.store.blob_path(self.layers[1]))
        self.assertIsNone(self.store.open_blob(self.layers[1]))
        self.store.index.remove(self.image.digest)
        self.load()
        index = self.store.index
        self.assertNotIn(self.layers[1], index)
        self.assertNotIn(self.image.digest, index)
        self.assertEqual(index.referrers(self.layers[0]), set())
        self.assertEqual(index.stored, 3000)

    def test_what_landed_during_the_scan_wins_and_goes_last(self):
        """
        An entry committed while the scan ran is the newest after the load,
        once, with the size the reactor knows; a manifest stored meanwhile
        keeps its references.
        """
        data, late = blob(500, b"late")
        w = self.store.new_writer(late)
        w.write(data)
        w.commit()
        self.runner.run_all()
        w.close()
        other = manifest_of(OCI_MANIFEST, layers=[(self.layers[2], 1000)])
        self.store.put_manifest(other)
        self.runner.run_all()
        self.load()
        index = self.store.index
        self.assertEqual(list(index.digests())[-2:], [late, other.digest])
        self.assertEqual(len(index), 7)
        self.assertEqual(index.stored, 4500 + self.image.size + other.size)
        self.assertEqual(index.referrers(self.layers[2]), {other.digest})
        self.assertEqual(index.referrers(self.layers[0]), {self.image.digest})


class LazyLinkTests(SynchronousTestCase):
    """Links are read from their files when asked, and the answers used lately are kept."""

    def setUp(self):
        self.rig = Rig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)
        data, self.layer = blob(1000, b"lazy")
        cache_blob(self.rig.store, data, self.layer)
        self.image = manifest_of(OCI_MANIFEST, layers=[(self.layer, 1000)])
        self.rig.store.put_manifest(self.image, ("docker.io", "a/app"))
        self.store = Store(self.rig.root, inline, self.rig.reactor.seconds)
        self.store.prepare()
        Expiry(self.store, None, self.rig.reactor).startService()

    def test_a_link_on_disk_is_read_when_asked_and_then_remembered(self):
        """
        After a restart no link is in memory; the first question reads the
        file (through the manifest that names the layer), the answer is
        remembered and the layer gains a link of its own.
        """
        key = ("docker.io", "a/app")
        self.assertFalse(self.store.index.links.has(self.image.digest, key))
        self.assertTrue(self.successResultOf(self.store.linked(self.layer, key)))
        self.assertTrue(self.store.index.links.has(self.image.digest, key))
        self.assertTrue(self.store.index.links.has(self.layer, key))
        path = os.path.join(self.rig.root, "links", "sha256", self.layer.hex[:2], self.layer.hex)
        self.assertEqual(links.read(path), [key])

    def test_another_repository_is_not_linked(self):
        """The cross-repository rule holds with nothing in memory: another name is not known."""
        self.assertFalse(self.successResultOf(self.store.linked(self.layer, ("docker.io", "b/other"))))
        self.assertFalse(self.successResultOf(self.store.linked(self.image.digest, ("docker.io", "b/other"))))

    def test_the_cache_of_links_is_bounded(self):
        """However many digests are asked about, memory keeps the newest Links.size of them."""
        known = self.store.index.links
        known.size = 3
        for i in range(10):
            _, digest = blob(10, bytes([i]))
            known.add(digest, ("docker.io", "a/app"))
        self.assertEqual(len(known), 3)
        self.assertTrue(known.has(digest, ("docker.io", "a/app")))

    def test_a_link_already_in_the_file_is_not_written_again(self):
        """A link not in memory but in the file leaves the file as it was."""
        key = ("docker.io", "a/app")
        path = os.path.join(self.rig.root, "links", "sha256", self.image.digest.hex[:2], self.image.digest.hex)
        self.store.link(self.image.digest, key)
        self.assertEqual(links.read(path), [key])
        with open(path, "rb") as f:
            self.assertEqual(f.read(), links.line(key))


class BatchTests(SynchronousTestCase):
    """A large eviction pass goes in batches, one per reactor turn."""

    def test_a_pass_is_chosen_in_batches_one_per_turn(self):
        """
        Past the high-water mark, each turn chooses at most BATCH entries
        (their deletion starts at once) and the next turn goes on, until
        the store is under the low-water mark.
        """
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        self.patch(Expiry, "BATCH", 2)
        expiry = Expiry(rig.store, 20_000, rig.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        digests = []
        for i in range(19):
            data, digest = blob(1000, b"batch" + bytes([i]))
            cache_blob(rig.store, data, digest)
            digests.append(digest)
        data, digest = blob(1000, b"over")
        cache_blob(rig.store, data, digest)
        # 20,000 bytes: down to 17,000 takes three entries, two this turn.
        self.assertEqual([d in rig.store.index for d in digests[:3]], [False, False, True])
        rig.reactor.advance(0)
        self.assertEqual([d in rig.store.index for d in digests[:4]], [False, False, False, True])
        self.assertEqual(rig.store.index.total, 17_000)
        self.assertFalse(os.path.exists(rig.store.blob_path(digests[2])))

    def test_no_more_than_in_flight_batches_are_being_deleted(self):
        """
        While IN_FLIGHT batches are still being deleted no more are chosen,
        however many turns or checks come; the pass goes on as each is done.
        """
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        self.patch(Expiry, "BATCH", 2)
        expiry = Expiry(rig.store, None, rig.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        for i in range(20):
            data, digest = blob(1000, b"flight" + bytes([i]))
            cache_blob(rig.store, data, digest)
        runner = Deferring()
        rig.store._run = runner
        expiry.max_size = 10_600
        # Far below the high-water mark: a pass that stopped at the high
        # mark would show.
        expiry.LOW = 0.5
        expiry.check()
        rig.reactor.advance(0)
        self.assertEqual((len(expiry.evicting), len(rig.store.index)), (Expiry.IN_FLIGHT, 16))
        rig.reactor.advance(0)
        expiry.check()
        self.assertEqual(len(rig.store.index), 16)
        runner.run(0)
        rig.reactor.advance(0)
        self.assertEqual((len(expiry.evicting), len(rig.store.index)), (Expiry.IN_FLIGHT, 14))
        # Both batches done in one turn, each completion's check choosing
        # the next: the pass is not cut short of the low-water mark.
        while runner.calls:
            for _ in range(len(runner.calls)):
                runner.run(0)
            rig.reactor.advance(0)
        self.assertEqual(rig.store.index.total, 5_000)


class DeletionOrderTests(SynchronousTestCase):
    def test_a_later_deletion_waits_for_the_one_before(self):
        """
        A batch that takes a layer whose manifest an earlier batch took is
        deleted only after that one: a crash in between never leaves the
        manifest on disk naming a deleted layer.
        """
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        data, layer = blob(1000, b"ordered")
        cache_blob(rig.store, data, layer)
        image = manifest_of(OCI_MANIFEST, layers=[(layer, 1000)])
        rig.store.put_manifest(image)
        runner = Deferring()
        rig.store._run = runner
        index = rig.store.index
        first = rig.store.delete([(image.digest, index.remove(image.digest))])
        second = rig.store.delete([(layer, index.remove(layer))])
        self.assertEqual(len(runner.calls), 1)
        self.assertIn(rig.store.blob_path(image.digest), runner.calls[0][1][0])
        runner.run(0)
        self.assertEqual(self.successResultOf(first), None)
        self.assertTrue(os.path.exists(rig.store.blob_path(layer)))
        runner.run(0)
        self.assertEqual(self.successResultOf(second), None)
        self.assertFalse(os.path.exists(rig.store.blob_path(layer)))
