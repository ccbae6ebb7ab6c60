# -*- test-case-name: tests.test_exchange -*-
"""
The limits one upstream exchange runs under: a deadline for the response's
headers, then, for the small bodies regcache reads whole (a token, a
manifest, a tag list, or an error page read only to free the connection),
a size cap, an idle timer and an overall deadline.

Upstream decides how long its bodies are and how fast they come.  A server
that stalls after its headers, trickles a byte just often enough to look
alive, or streams gigabytes costs at most these limits, and then fails like
any other outage, so the shared work waiting on it (a token fetch, a tag
check) ends and stale copies stand in.  Every failure comes out as an
UpstreamError in words.  Blob bodies are streamed to disk instead, under
inflight.py's idle timer.
"""

from typing import Callable, List, Optional

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from regcache.errors import UpstreamError, UpstreamTimeout, transport_error

#: The most of an error page read before the connection is given up.
DISCARD_LIMIT = 64 * 1024


class _Reader(Protocol):
    """
    Collects one body.  ``done`` fires the moment the outcome is known (the
    body ended, or a limit was hit), not when the transport has finished
    closing: closing a stalled connection must not extend the wait.
    """

    def __init__(self, limits: "Limits", limit: int, who: str, what: str):
        self.done: Deferred = Deferred()
        self._limits = limits
        self._limit = limit
        self._who = who
        self._what = what
        self._chunks: List[bytes] = []
        self._size = 0
        self._timers: List = []

    def connectionMade(self) -> None:
        idle, deadline, clock = self._limits.idle, self._limits.deadline, self._limits.clock
        self._timers = [
            clock.callLater(idle, self._give_up,
                            f"{self._who} stopped sending the {self._what} for {idle:g} s (--idle-timeout)"),
            clock.callLater(deadline, self._give_up,
                            f"{self._who} took more than {deadline:g} s to send the {self._what}"),
        ]

    def announced(self, length) -> None:
        """Refuse at once a body whose Content-Length is already past the cap."""
        if length is not UNKNOWN_LENGTH and length is not None and length > self._limit:
            self._too_large()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._too_large()
            return
        self._chunks.append(data)
        idle = self._timers[0]
        if idle.active():
            idle.reset(self._limits.idle)

    def connectionLost(self, reason) -> None:
        self._stop_timers()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(transport_error(self._who, reason, f"reading the {self._what}"))

    def _too_large(self) -> None:
        self._give_up(f"{self._who} sent a {self._what} larger than {self._limit} bytes", 502)

    def _give_up(self, message: str, status: Optional[int] = None) -> None:
        self._stop_timers()
        self._chunks = []
        if self.done.called:
            return
        self.done.errback(UpstreamError(message, status))
        self.transport.stopProducing()

    def _stop_timers(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()


def _timed_out(result, timeout) -> Failure:
    """
    Twisted's HTTP client wraps the cancellation of a request in
    ResponseFailed or ResponseNeverReceived; a timeout is a timeout.
    """
    return Failure(TimeoutError())


class Limits:
    """
    For one upstream: ``header`` seconds for a response to begin; for a
    buffered body, ``idle`` seconds without a byte and ``deadline`` seconds
    in all.
    """

    def __init__(self, clock, header: float, idle: float, deadline: float):
        self.clock = clock
        self.header = header
        self.idle = idle
        self.deadline = deadline

    async def answer(self, send: Callable[[], Deferred], who: str, during: str):
        """
        The response ``send`` (an HTTP client call) gets within the header
        deadline; otherwise an UpstreamTimeout, or an UpstreamError saying
        what went wrong, even if the client refused the request at once.
        """
        try:
            return await send().addTimeout(self.header, self.clock, onTimeoutCancel=_timed_out)
        except TimeoutError:
            raise UpstreamTimeout(f"{who} did not answer within {self.header:g} s (--header-timeout)") from None
        except CancelledError:
            # Whoever waited gave up: no news of the upstream's health.
            raise
        except Exception:
            raise transport_error(who, Failure(), during) from None

    def read(self, response, limit: int, who: str, what: str) -> Deferred:
        """
        The whole body of ``response``, at most ``limit`` bytes; fails with
        an UpstreamError that names ``who`` sent ``what``.
        """
        reader = _Reader(self, limit, who, what)
        response.deliverBody(reader)
        reader.announced(response.length)
        return reader.done

    async def discard(self, response, who: str) -> None:
        """
        Read and drop a body nobody needs, so the connection can be reused;
        one too big or too slow is given up with its connection.
        """
        try:
            await self.read(response, DISCARD_LIMIT, who, "error page")
        except UpstreamError:
            pass


class _Abandon(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


def abandon(response) -> None:
    """
    Give up a response whose body will never be read (a blob refused on its
    headers) with its connection: left unread, it would hold the connection
    open, and the pool's slot, for as long as upstream keeps it.
    """
    response.deliverBody(_Abandon())
