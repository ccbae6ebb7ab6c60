# test-case-name: tests.test_service
"""
Building the whole service from a Config: it touches nothing process-wide.
The upstream client's own connections are sized in tests/test_upstream_http.py.
"""

import shutil
import tempfile

from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from regcache.config import load
from regcache.listener import Listener
from regcache.service import build


class BuildTests(SynchronousTestCase):
    def test_building_the_service_changes_no_connection_class(self):
        """
        Building the whole service leaves every connection class's read
        size as Twisted has it: client connections and other outgoing
        connections are not the upstream client's to size.
        """
        storage = tempfile.mkdtemp(prefix="regcache-test-")
        self.addCleanup(shutil.rmtree, storage, True)
        config = load({"listen": "tcp:0:interface=127.0.0.1", "storage": storage,
                       "upstream": "http://127.0.0.1:1"}, {})
        before = {cls: cls.bufferSize for cls in (tcp.Client, tcp.Server, tcp.Connection)}
        top = build(config, MemoryReactorClock())
        self.assertEqual([type(s) for s in top if isinstance(s, Listener)], [Listener])
        self.assertEqual({cls: cls.bufferSize for cls in before}, before)
        self.assertEqual(before[tcp.Client], tcp.Connection.bufferSize)

    def test_each_upstream_gets_its_revalidate_deadline(self):
        """The Registry the mirror reads holds the deadline its upstream was configured with."""
        from twisted.internet.task import Clock

        from regcache.metrics import Metrics
        from regcache.service import _registry

        config = load({"upstream": "http://127.0.0.1:1", "revalidate-deadline": "750ms"}, {})
        (upstream,) = config.upstreams
        self.assertEqual(_registry(upstream, Clock(), Metrics()).revalidate_deadline, 0.75)
