# test-case-name: tests.test_readiness
"""
/readyz: ready while the store is still being indexed, not while it cannot
be written; ready on a full disk, which eviction handles.  The write probe runs
on the rig's clock, so each period is exact.
"""

import os
import shutil

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from regcache.expiry import Expiry
from regcache.readiness import PROBE, Readiness
from tests.support import Rig, fill_up, small_filesystem


class ReadinessTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)

    def readyz(self):
        c = self.rig.client("/readyz")
        return c.status(), c.body().decode()

    def index(self):
        Expiry(self.rig.store, None, self.rig.reactor).startService()

    def start(self):
        self.rig.readiness.startService()
        self.addCleanup(self.rig.readiness.stopService)

    def test_ready_while_the_index_loads(self):
        """
        /readyz is 200 before the start-up index has loaded (on a big store
        that takes seconds, and the store serves meanwhile), and stays 200
        once it has.
        """
        self.assertFalse(self.rig.store.index.ready)
        self.assertEqual(self.readyz(), (200, "ready\n"))
        self.index()
        self.assertTrue(self.rig.store.index.ready)
        self.assertEqual(self.readyz(), (200, "ready\n"))

    def test_a_store_that_cannot_be_written_is_not_ready_until_it_can(self):
        """
        A failing store directory makes the next probe say not ready, with
        the error; once it can be written again the next probe says ready,
        and no probe file is left behind.
        """
        self.index()
        self.start()
        before = sorted(os.listdir(self.rig.root))
        in_the_way = os.path.join(self.rig.root, PROBE)
        os.mkdir(in_the_way)  # the probe's write now fails (EISDIR)
        self.assertEqual(self.readyz()[0], 200, "no probe has run yet")
        self.rig.reactor.advance(Readiness.EVERY)
        status, body = self.readyz()
        self.assertEqual(status, 503)
        self.assertIn("the store cannot be written", body)
        self.assertIn("Is a directory", body)
        os.rmdir(in_the_way)
        self.rig.reactor.advance(Readiness.EVERY)
        self.assertEqual(self.readyz(), (200, "ready\n"))
        self.assertEqual(sorted(os.listdir(self.rig.root)), before)

    def test_a_full_disk_is_ready(self):
        """A store whose disk is full is still ready: eviction makes room, other replicas would not help."""
        with small_filesystem("256k") as root:
            rig = Rig(root=os.path.join(root, "store"))
            Expiry(rig.store, None, rig.reactor).startService()
            rig.readiness.startService()
            fill_up(root)
            rig.reactor.advance(Readiness.EVERY)
            self.assertIsNone(rig.readiness.problem())
            self.assertEqual(rig.client("/readyz").status(), 200)
            self.assertNotIn(PROBE, os.listdir(rig.root))
            rig.readiness.stopService()

    def test_a_probe_that_never_returns_is_not_ready(self):
        """
        A write that has not returned within a whole period (a hung mount)
        is not ready, and no second probe is piled onto the pool beside it;
        when it returns, the store is ready again.
        """
        self.index()
        probes = []

        def hung(f, *args):
            probes.append(Deferred())
            return probes[-1]

        readiness = Readiness(self.rig.store, hung, self.rig.reactor)
        readiness.startService()
        self.addCleanup(readiness.stopService)
        self.rig.reactor.advance(Readiness.EVERY)
        self.assertEqual((len(probes), readiness.problem()), (1, None))
        self.rig.reactor.advance(Readiness.EVERY)
        self.assertEqual(len(probes), 1)
        self.assertEqual(readiness.problem(), "the store cannot be written: a write has not returned for 10s")
        probes[0].callback(None)
        self.assertIsNone(readiness.problem())
