# test-case-name: tests.test_reload
"""
Reloading on SIGHUP: what may change without a restart (the pull policy,
the upstream passwords, client authentication's htpasswd file, the served
TLS key and certificate) registers a reloader here, and one signal runs
them all.

The signal handler only asks the reactor to run the reload
(``callFromThread``), so reloaders run in the reactor's thread, between
requests, and may return Deferreds to do their reading off it.  A reloader
that fails has kept what it had: it says why by raising, and the failure is
logged in one line and counted, so an operator's bad edit never takes
anything away from a running mirror.
"""

from typing import Any, Callable, Dict, List, Tuple

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from regcache.auth import Credentials
from regcache.config import restart_needed


class Reloads(Service):
    """
    The registered reloaders and the SIGHUP handler.  ``install(handler)``
    puts ``handler`` in place for the signal and returns a callable that
    puts the previous one back: the edge (service.py) owns the signal
    module, this class only what a signal does.
    """

    log = Logger()

    def __init__(self, reactor, metrics, install: Callable[[Callable[[], None]], Callable[[], None]]):
        self.reactor = reactor
        self.metrics = metrics
        self._install = install
        self._restore = None
        self._reloaders: List[Tuple[str, Callable]] = []
        self._running = False
        self._again = False

    def register(self, what: str, reload: Callable) -> None:
        """
        ``reload()`` re-reads ``what`` (the metrics' label: a fixed word)
        and swaps it in, or raises (or fails its Deferred) leaving the old.
        """
        self._reloaders.append((what, reload))
        for result in ("ok", "failed"):
            self.metrics.reloads.labels(what, result)

    @property
    def names(self) -> List[str]:
        """What a SIGHUP reloads, in order."""
        return [what for what, _ in self._reloaders]

    def startService(self):
        super().startService()
        self._restore = self._install(self.requested)

    def stopService(self):
        super().stopService()
        if self._restore is not None:
            self._restore()
            self._restore = None

    def requested(self) -> None:
        """The signal arrived: safe to call from a signal handler."""
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        Run every reloader once, in turn.  Signals that arrive meanwhile
        make one more round, not one each: a burst of SIGHUPs is one reload.
        """
        if self._running:
            self._again = True
            return
        self._running = True
        self.log.info("Reloading on SIGHUP: {what}", what=", ".join(self.names) or "nothing")
        self._next(0)

    def _next(self, i: int) -> None:
        if i == len(self._reloaders):
            self._running = False
            if self._again:
                self._again = False
                self.reload()
            return
        what, reload = self._reloaders[i]
        d = maybeDeferred(reload)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(what,), errbackArgs=(what,))
        d.addBoth(lambda _: self._next(i + 1))

    def _succeeded(self, _, what: str) -> None:
        self.metrics.reloads.labels(what, "ok").inc()
        self.log.info("Reloaded {what}", what=what)

    def _failed(self, failure, what: str) -> None:
        self.metrics.reloads.labels(what, "failed").inc()
        if isinstance(failure.value, ValueError):
            # A ConfigError and its kin carry a one-line message made for
            # the operator.
            self.log.error("Reloading {what} failed, keeping the old one: {why}", what=what, why=str(failure.value))
        else:
            self.log.failure("Reloading {what} failed, keeping the old one", failure, what=what)


def policy_reloader(config, reread: Callable, run: Callable, pulls) -> Callable:
    """
    The pull policy's reloader: re-read the whole configuration as a
    restart would (``reread``, run off the reactor by ``run``) and swap its
    rules into ``pulls``.  Anything else the file changes takes a restart;
    the log says so, naming the settings, never their values.
    """
    log = Logger(namespace="regcache.reload.policy")

    async def reload():
        new = await run(reread)
        pulls.replace(new.policy)
        changed = restart_needed(config, new)
        if changed:
            log.warn("The configuration also changes {settings}: that takes a restart; only the pull policy "
                     "was reloaded", settings=", ".join(changed))

    return reload


def credentials_reloader(reread: Callable, run: Callable, members: Dict[Tuple[str, str], Any]) -> Callable:
    """
    The upstream passwords' reloader: re-read the configuration (password
    files, the config file's passwords) off the reactor and give each
    member, keyed by (upstream name, URL), its new password.  A changed
    user name is a different account, whose accounting starts anew: that
    takes a restart, and the policy reloader says so.  The log names the
    members whose password changed, never a password.
    """
    log = Logger(namespace="regcache.reload.credentials")

    async def reload():
        new = await run(reread)
        for upstream in new.upstreams:
            for url in upstream.urls:
                member = members.get((upstream.name, url.url))
                if member is None or not url.username:
                    continue
                old = member.credentials
                if old is None or old.username != url.username or old.password == url.password:
                    continue
                member.replace_credentials(Credentials(url.username, url.password))
                log.info("New password for {user} at {url}; its cached tokens were dropped", user=url.username,
                         url=url.url)

    return reload
