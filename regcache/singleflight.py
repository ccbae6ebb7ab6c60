# test-case-name: tests.test_singleflight
"""
One piece of work per key, shared by everyone who asks while it runs: one
upstream check per tag, one manifest GET per digest, one token fetch per
scope, however many clients ask at once.

The shared work is never handed to a caller directly.  Each caller gets a
Deferred of its own, so a client that hangs up (Klein cancels its Deferred)
cancels only its own wait, never the work the others depend on.
"""

from typing import Callable, Dict, Hashable, List

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from regcache.errors import IntegrityError, RegistryError, UpstreamError, UpstreamNotFound


class SingleFlight:
    """
    Run at most one ``work`` per key at a time; every caller for that key
    gets its own Deferred of the shared result.
    """

    log = Logger()

    def __init__(self) -> None:
        self._waiting: Dict[Hashable, List[Deferred]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._waiting

    def __len__(self) -> int:
        """Keys with work under way: a caller keyed by client input bounds it with this."""
        return len(self._waiting)

    def run(self, key: Hashable, work: Callable[[], Deferred]) -> Deferred:
        waiters = self._waiting.get(key)
        first = waiters is None
        if first:
            waiters = self._waiting[key] = []
        d: Deferred = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(d)
        if first:
            try:
                shared = work()
            except Exception:
                shared = fail()
            shared.addBoth(self._deliver, key)
        return d

    def _deliver(self, result, key: Hashable) -> None:
        waiters = self._waiting.pop(key, [])
        if not waiters and isinstance(result, Failure):
            self._unheard(result, key)
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _unheard(self, failure: Failure, key: Hashable) -> None:
        """
        Every caller gave up before the work failed: nobody else will say
        so.  An upstream or integrity failure is news for the log; anything
        else is a bug and keeps its traceback.
        """
        if failure.check(UpstreamError, UpstreamNotFound, IntegrityError, RegistryError):
            self.log.warn("Shared work for {key} failed after every caller left: {error}",
                          key=repr(key), error=failure.getErrorMessage())
        else:
            self.log.failure("Shared work for {key} failed after every caller left", failure, key=repr(key))
