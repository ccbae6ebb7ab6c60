# test-case-name: tests.test_probe
"""
The optional rate-limit probe (``--ratelimit-probe 10m``): Docker Hub's free
quota check for each Docker Hub credential, so the remaining-quota figures
are fresh even when nothing is pulled.

Each check is a token for ``repository:ratelimitpreview/test:pull`` and a
HEAD of that repository's ``latest`` (upstream.Upstream.probe_ratelimit):
no pull is counted, by Docker Hub or by regcache; the answer's rate-limit
headers reach the metrics and the pull accounting as any answer's do.
"""

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from regcache.errors import UpstreamError, UpstreamNotFound


class RateLimitProbe(Service):
    """Every ``every`` seconds, from start-up on, one check per member in ``members``."""

    log = Logger()

    def __init__(self, members, clock, every: float):
        self.members = list(members)
        self.every = every
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.probe()))
        self._loop.clock = clock

    def startService(self):
        super().startService()
        self._loop.start(self.every, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    async def probe(self) -> None:
        """
        Check every member in turn.  A failure is logged and the others are
        still checked: the loop must never stop (a LoopingCall that raises
        is dead for good).
        """
        for member in self.members:
            try:
                await member.probe_ratelimit()
            except UpstreamNotFound:
                self.log.info("Rate-limit probe: {member} has no ratelimitpreview/test (not Docker Hub?)",
                              member=member.host)
            except UpstreamError as e:
                self.log.warn("Rate-limit probe of {member} failed: {error}", member=member.host, error=str(e))
            except Exception:
                self.log.failure("Rate-limit probe of {member} failed", member=member.host)
