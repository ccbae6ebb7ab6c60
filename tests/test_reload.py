# test-case-name: tests.test_reload
"""
Reloading on SIGHUP: the handler defers to the reactor, every reloader
runs, a burst of signals is one reload, and a failed reload keeps what was
running, logged in one line and counted.  The pull policy's reloader swaps
the rules and says when the file changed more than they.
"""

import os
import shutil
import tempfile

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from regcache.config import ConfigError, load
from regcache.identity import EVERYONE
from regcache.metrics import Metrics
from regcache.policy import Registry, Route
from regcache.auth import Credentials
from regcache.reload import Reloads, credentials_reloader, policy_reloader
from regcache.rules import PullRules
from regcache.service import build

CONFIG = """\
upstreams:
  - name: hub
    urls: [https://{host}]
policy:
  hub:
    default: {default}
    rules:
      - allow: library/*
"""


class ThreadedClock(Clock):
    """A Clock that is also a reactor's callFromThread: the call runs at the next turn of the loop."""

    def callFromThread(self, f, *args):
        self.callLater(0, f, *args)


class Signal:
    """A stand-in for the signal module: what was installed, and whether the old handler is back."""

    def __init__(self):
        self.handler = None
        self.restored = False

    def install(self, handler):
        self.handler = handler
        return self.restore

    def restore(self):
        self.restored = True


def events(test):
    seen = []
    globalLogPublisher.addObserver(seen.append)
    test.addCleanup(globalLogPublisher.removeObserver, seen.append)
    return seen


def count(metrics, what, result):
    return metrics.registry.get_sample_value("regcache_reloads_total", {"what": what, "result": result})


class ReloadsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = ThreadedClock()
        self.metrics = Metrics()
        self.signal = Signal()
        self.reloads = Reloads(self.clock, self.metrics, self.signal.install)
        self.calls = []

    def test_a_signal_runs_every_reloader_in_the_reactor(self):
        """The handler only schedules: the reloaders run at the reactor's next turn, each once, and count ok."""
        self.reloads.register("policy", lambda: self.calls.append("policy"))
        self.reloads.register("htpasswd", lambda: self.calls.append("htpasswd"))
        self.reloads.startService()
        self.signal.handler()
        self.assertEqual(self.calls, [])
        self.clock.advance(0)
        self.assertEqual(self.calls, ["policy", "htpasswd"])
        self.assertEqual((count(self.metrics, "policy", "ok"), count(self.metrics, "htpasswd", "ok")), (1, 1))
        self.reloads.stopService()
        self.assertTrue(self.signal.restored)

    def test_a_burst_of_signals_during_a_reload_is_one_more_reload(self):
        """Signals that arrive while a reload runs make one more round after it, not one each."""
        held = []

        def slow():
            held.append(Deferred())
            return held[-1]

        self.reloads.register("policy", slow)
        for _ in range(6):
            self.reloads.reload()
        self.assertEqual(len(held), 1)
        held[0].callback(None)
        self.assertEqual(len(held), 2)
        held[1].callback(None)
        self.assertEqual(len(held), 2)
        self.assertEqual(count(self.metrics, "policy", "ok"), 2)

    def test_a_failed_reloader_is_logged_in_one_line_counted_and_the_next_still_runs(self):
        """A reloader that fails is an error event with its one-line reason and a failed count; the others run."""
        seen = events(self)
        self.reloads.register("policy", lambda: fail(ConfigError("regcache.yaml:3: policy.hub: bad")))
        self.reloads.register("htpasswd", lambda: self.calls.append("htpasswd"))
        self.reloads.reload()
        self.assertEqual(self.calls, ["htpasswd"])
        self.assertEqual((count(self.metrics, "policy", "failed"), count(self.metrics, "policy", "ok")), (1, 0))
        errors = [e for e in seen if e.get("log_level") == LogLevel.error]
        self.assertEqual([e["why"] for e in errors], ["regcache.yaml:3: policy.hub: bad"])


class PolicyReloaderTests(SynchronousTestCase):
    def setUp(self):
        fd, self.path = tempfile.mkstemp(suffix=".yaml", prefix="regcache-reload-")
        os.close(fd)
        self.addCleanup(os.unlink, self.path)
        self.write(default="allow")
        self.config = load({"config": self.path}, {})
        self.metrics = Metrics()
        self.pulls = PullRules(self.config.policy, self.metrics)
        self.reloads = Reloads(ThreadedClock(), self.metrics, Signal().install)
        self.reloads.register("policy", policy_reloader(
            self.config, lambda: load({"config": self.path}, {}), maybeDeferred, self.pulls))

    def write(self, text=None, host="registry-1.docker.io", default="allow"):
        with open(self.path, "w") as f:
            f.write(text if text is not None else CONFIG.format(host=host, default=default))

    def allowed(self, name):
        registry = Registry("hub", frozenset(), None, 60, None)
        try:
            self.pulls.check(Route(registry, name, client=EVERYONE), "manifests", "latest")
        except Exception as e:
            return e.code
        return "allowed"

    def test_a_good_file_swaps_the_rules(self):
        """After a reload the new default applies; the old one did not deny."""
        self.assertEqual(self.allowed("myorg/app"), "allowed")
        self.write(default="deny")
        self.reloads.reload()
        self.assertEqual((self.allowed("myorg/app"), self.allowed("library/alpine")), ("DENIED", "allowed"))
        self.assertEqual(count(self.metrics, "policy", "ok"), 1)

    def test_a_bad_file_keeps_the_old_rules(self):
        """A file that does not load (bad YAML, a bad rule) changes nothing, and is a failed reload naming why."""
        seen = events(self)
        for text in ("upstreams: [\n", CONFIG.format(host="registry-1.docker.io", default="deny") + "      - allow: x/***\n"):
            self.write(text)
            self.reloads.reload()
            self.assertEqual(self.allowed("myorg/app"), "allowed")
        self.assertEqual(count(self.metrics, "policy", "failed"), 2)
        whys = [e["why"] for e in seen if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(whys), 2)
        self.assertIn("not valid YAML", whys[0])
        self.assertIn("policy.hub.rules[1].allow: 'x/***'", whys[1])

    def test_upstream_changes_are_left_for_a_restart_and_said_so(self):
        """Rules reload even when the upstreams changed too; the warning names what takes a restart."""
        seen = events(self)
        self.write(host="mirror.gcr.io", default="deny")
        self.reloads.reload()
        self.assertEqual(self.allowed("myorg/app"), "DENIED")
        warnings = [e for e in seen if e.get("log_level") == LogLevel.warn]
        self.assertEqual([e["settings"] for e in warnings], ["upstreams"])
        self.assertNotIn("mirror.gcr.io", str([e.get("log_format") for e in warnings]))


class WiringTests(SynchronousTestCase):
    def test_the_service_reloads_the_policy_of_its_config_file(self):
        """Built with a way to re-read its configuration, the service reloads the policy on SIGHUP; without, nothing."""
        storage = tempfile.mkdtemp(prefix="regcache-test-")
        self.addCleanup(shutil.rmtree, storage, True)
        fd, path = tempfile.mkstemp(suffix=".yaml", prefix="regcache-reload-")
        with os.fdopen(fd, "w") as f:
            f.write(CONFIG.format(host="127.0.0.1:1", default="deny"))
        self.addCleanup(os.unlink, path)
        cli = {"listen": "tcp:0:interface=127.0.0.1", "storage": storage, "config": path}
        config = load(cli, {})
        top = build(config, MemoryReactorClock(), reread=lambda: load(cli, {}))
        self.assertEqual([s.names for s in top if isinstance(s, Reloads)], [["policy"]])
        self.assertEqual([s for s in build(config, MemoryReactorClock()) if isinstance(s, Reloads)], [])


class Member:
    """What the credentials reloader sees of an upstream member: its credentials, and the swap."""

    def __init__(self, credentials):
        self.credentials = credentials
        self.replaced = []

    def replace_credentials(self, credentials):
        self.credentials = credentials
        self.replaced.append(credentials)


class CredentialsReloaderTests(SynchronousTestCase):
    def setUp(self):
        fd, self.secret = tempfile.mkstemp(prefix="regcache-password-")
        os.close(fd)
        self.addCleanup(os.unlink, self.secret)
        self.write("first")
        self.cli = {"upstream": "https://reg.internal", "username": "bob", "password-file": self.secret}
        config = load(self.cli, {})
        ((upstream_url,),) = [u.urls for u in config.upstreams]
        self.member = Member(Credentials(upstream_url.username, upstream_url.password))
        self.reload = credentials_reloader(lambda: load(self.cli, {}), maybeDeferred,
                                           {(config.upstreams[0].name, upstream_url.url): self.member})

    def write(self, password):
        with open(self.secret, "w") as f:
            f.write(password + "\n")

    def test_a_new_password_is_swapped_in_and_logged_without_it(self):
        """A changed password file gives the member the new password; the log names the user, not the password."""
        seen = events(self)
        self.write("second")
        self.successResultOf(maybeDeferred(self.reload))
        self.assertEqual(self.member.replaced, [Credentials("bob", "second")])
        self.assertNotIn("second", repr([e for e in seen if e.get("log_namespace", "").startswith("regcache")]))

    def test_an_unchanged_password_changes_nothing(self):
        """The same password again keeps the member's credentials (and so its tokens)."""
        self.successResultOf(maybeDeferred(self.reload))
        self.assertEqual(self.member.replaced, [])

    def test_an_unreadable_file_fails_the_reload_and_keeps_the_old_password(self):
        """A password file that has gone is a failed reload; the member keeps what it had."""
        os.unlink(self.secret)
        self.addCleanup(self.write, "")
        self.failureResultOf(maybeDeferred(self.reload), ConfigError)
        self.assertEqual(self.member.credentials, Credentials("bob", "first"))
