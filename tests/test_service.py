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

from regcache.config import ConfigError, load
from regcache.listener import Listener
from regcache.probe import RateLimitProbe
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

    def config(self, **extra):
        storage = tempfile.mkdtemp(prefix="regcache-test-")
        self.addCleanup(shutil.rmtree, storage, True)
        return load({"listen": "tcp:0:interface=127.0.0.1", "storage": storage,
                     "upstream": "http://127.0.0.1:1", **extra}, {})

    def test_metrics_listen_is_a_second_port(self):
        """With --metrics-listen the service has a second listener, of /metrics alone."""
        top = build(self.config(**{"metrics-listen": "tcp:0:interface=127.0.0.1"}), MemoryReactorClock())
        listeners = [s for s in top if isinstance(s, Listener)]
        self.assertEqual([s.option for s in listeners], ["--listen", "--metrics-listen"])

    def test_a_bad_metrics_listen_is_named(self):
        """An endpoint --metrics-listen cannot use stops the build, naming that option."""
        with self.assertRaises(ConfigError) as e:
            build(self.config(**{"metrics-listen": "tcp:nope"}), MemoryReactorClock())
        self.assertIn("--metrics-listen: cannot use 'tcp:nope'", str(e.exception))

    def test_the_probe_runs_only_when_asked(self):
        """The rate-limit probe is a service only with --ratelimit-probe."""
        self.assertEqual([s for s in build(self.config(), MemoryReactorClock()) if isinstance(s, RateLimitProbe)], [])
        top = build(self.config(**{"ratelimit-probe": "10m"}), MemoryReactorClock())
        self.assertEqual([s.every for s in top if isinstance(s, RateLimitProbe)], [600])

    def test_each_upstream_gets_its_revalidate_deadline(self):
        """The Registry the mirror reads holds the deadline its upstream was configured with."""
        from twisted.internet.task import Clock

        from regcache.metrics import Metrics
        from regcache.service import _registry

        config = load({"upstream": "http://127.0.0.1:1", "revalidate-deadline": "750ms"}, {})
        (upstream,) = config.upstreams
        self.assertEqual(_registry(upstream, Clock(), Metrics()).revalidate_deadline, 0.75)
