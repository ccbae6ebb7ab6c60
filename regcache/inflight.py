# test-case-name: tests.test_inflight,tests.test_range_inflight
"""
One upstream download per blob, however many clients ask at once, followed
by every waiting client.

A Fill writes a blob into the store while any number of readers follow the
growing file at their own pace.  The disk is the one consumer the download
waits for; a slow reader only falls behind in the file, it never slows the
download or grows memory.  A client that hangs up only stops following; the
download goes on for the others and for the cache, and on shutdown
FillDrain gives the downloads under way a few seconds to land.

Work shared by key without a file to follow (tag checks, manifest GETs,
tokens) is regcache.singleflight's.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from regcache.errors import IntegrityError, UpstreamError, transport_error
from regcache.reference import Digest
from regcache.remote import BlobStream, Remote


@dataclass(frozen=True)
class RateFloor:
    """
    The slowest a download may average: ``rate`` bytes a second, judged over
    each ``window`` seconds.  The idle timer restarts at every byte, so an
    upstream dripping a byte a second would hold a fill (and every client
    waiting on it) for ever; this is the overall deadline.  A rate of 0
    means no floor.
    """

    rate: float = 10_000.0
    window: float = 60.0


class SlowUpstream(UpstreamError):
    """An upstream that sent a blob more slowly than the floor allows."""


class _FillProtocol(Protocol):
    """
    Receives one upstream blob body into a Fill, skipping ``skip`` bytes
    first (an upstream that sent the whole blob to a resume), and ends the
    response if it stalls for ``idle`` seconds or averages less than the
    rate floor over a window.  A pause while the store makes room is
    regcache's own wait, not upstream's stall: both timers stop for it.
    """

    def __init__(self, fill: "Fill", skip: int, clock, idle: float, source: str, floor: RateFloor = RateFloor()):
        self.fill = fill
        self.skip = skip
        self.done: Deferred = Deferred()
        self._clock = clock
        self._idle = idle
        self._source = source
        self._floor = floor
        self._timer = None
        self._window = None
        self._window_bytes = 0
        self._error: Optional[Exception] = None
        self._waiting_room = False
        self._lost = False

    def connectionMade(self) -> None:
        self._start_timer()

    def _start_window(self) -> None:
        self._window_bytes = 0
        if self._floor.rate > 0:
            self._window = self._clock.callLater(self._floor.window, self._judge)

    def _stop_window(self) -> None:
        if self._window is not None and self._window.active():
            self._window.cancel()
        self._window = None

    def _judge(self) -> None:
        self._window = None
        rate = self._window_bytes / self._floor.window
        if rate < self._floor.rate:
            self._error = SlowUpstream(
                f"upstream {self._source} sent the blob at {rate:.0f} bytes/s over {self._floor.window:g} s, "
                f"under the floor of {self._floor.rate:.0f} bytes/s (--min-download-rate)"
            )
            self.transport.stopProducing()
            return
        self._start_window()

    def _start_timer(self) -> None:
        self._timer = self._clock.callLater(self._idle, self._stalled)
        self._start_window()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._stop_window()

    def _stalled(self) -> None:
        self._timer = None
        self._error = UpstreamError(
            f"upstream {self._source} stopped sending the blob for {self._idle:g} s (--idle-timeout)"
        )
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._timer is not None:
            self._timer.reset(self._idle)
        self._window_bytes += len(data)
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            data = data[cut:]
            if not data:
                return
        try:
            self.fill._append(data, self._source)
        except Exception as e:
            self._error = e
            self.transport.stopProducing()
            return
        wait = None if self._waiting_room else self.fill._writer.room()
        if wait is not None:
            # Evicted files are still being deleted: let them go before
            # writing more, so the store stays under its size limit.
            self._waiting_room = True
            self._stop_timer()
            self.transport.pauseProducing()
            wait.addCallback(self._room_made)

    def _room_made(self, _) -> None:
        self._waiting_room = False
        if self._lost or self._error is not None:
            return
        self._start_timer()
        self.transport.resumeProducing()

    def connectionLost(self, reason) -> None:
        self._lost = True
        self._stop_timer()
        if self._error is not None:
            self.done.errback(self._error)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(transport_error(f"upstream {self._source}", reason, "reading a blob"))


class Fill:
    """
    One download of one blob from upstream into the store.

    Readers learn the size as soon as upstream answers (``wait_started``),
    then read up to ``readable()`` and ``subscribe`` to hear of more, and of
    ``verified`` or ``failure``.  Until the whole blob matched its digest a
    reader holds back the last byte of its span (see regcache.body), so on
    a mismatch every client is still missing one when it is aborted.
    """

    log = Logger()

    #: Resumes in a row without a byte of progress before the fill gives up.
    MAX_STALLED_RESUMES = 3

    def __init__(self, upstream: Remote, name: str, digest: Digest, store, clock, metrics,
                 floor: RateFloor = RateFloor(), shared=None):
        self.floor = floor
        #: The shared level (regcache.shared), if any: where the bytes come
        #: from first, and where they go once verified.
        self.shared = shared
        self.upstream = upstream
        self.name = name
        self.digest = digest
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.size: Optional[int] = None
        self.written = 0
        self.verified = False
        self.failure: Optional[Exception] = None
        self.resumes = 0
        #: The registry sending the blob, once one answered.
        self.source: Optional[str] = None
        #: Clients that asked for this download: each waits for its end,
        #: since the last byte is held back until the blob is verified.
        self.clients = 0
        self._writer = None
        self._listeners: List[Callable[[], None]] = []
        self._started: List[Deferred] = []

    # For readers

    def wait_started(self) -> Deferred:
        """
        A Deferred of the blob's size, fired once upstream answered.
        """
        self.clients += 1
        if self.failure is not None:
            return fail(self.failure)
        if self.size is not None:
            return succeed(self.size)
        d: Deferred = Deferred(lambda d: self._started.remove(d) if d in self._started else None)
        self._started.append(d)
        return d

    def readable(self) -> int:
        return self.written

    def reader(self) -> Optional[int]:
        """
        A descriptor of the growing file for one reader, or None once the
        file has moved into the store (open it there instead).
        """
        if self._writer is None or self._writer.closed:
            return None
        return self._writer.reader()

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _fire_started(self) -> None:
        started, self._started = self._started, []
        for d in started:
            if self.failure is not None:
                d.errback(self.failure)
            else:
                d.callback(self.size)

    # The download

    def _append(self, data: bytes, source: str) -> None:
        if self.size is not None and self.written + len(data) > self.size:
            raise IntegrityError(f"upstream sent more than {self.size} bytes for {self.digest}")
        self._writer.write(data)
        self.written += len(data)
        if self.shared is not None and self.shared.sent(source):
            # Not upstream's bytes: no pull, and not in its accounting.
            self.metrics.shared_bytes.labels(self.shared.sent(source)).inc(len(data))
        else:
            self.metrics.blob_bytes(self.upstream.key, source, len(data))
        self._notify()

    async def run(self) -> None:
        try:
            try:
                self._writer = self.store.new_writer(self.digest)
                await self._download()
                if not self._writer.matches(self.size):
                    raise IntegrityError(
                        f"blob from upstream does not match {self.digest} ({self.written} bytes)"
                    )
            except Exception as e:
                # Every reader hears of the failure, even one that failed
                # before a byte was written (say, a full disk refusing the
                # temp file).  Not GeneratorExit: a fill whose coroutine is
                # being closed (collected with everything that waited on it)
                # only cleans up.
                self.failure = e
                self._fire_started()
                self._notify()
                raise
            self.verified = True
            self._fire_started()
            self._notify()
            # From here on the readers' bytes are good: a commit that fails
            # only means the blob is not cached.  Readers finish from their
            # own descriptors, which outlive the temp file's name.
            await self._writer.commit()
            self.metrics.fills.labels("landed").inc()
        except BaseException as e:
            if self._writer is not None:
                self._writer.discard()
            self.metrics.fills.labels("failed").inc()
            if self.shared is not None:
                self.shared.failed(self.digest, e, self.source)
            raise
        else:
            if self.shared is not None:
                self.shared.landed(self.digest, self.size)
        finally:
            if self._writer is not None:
                self._writer.close()

    async def _download(self) -> None:
        stalled = 0
        if self.shared is not None:
            stream = await self.shared.open_blob(self.upstream, self.name, self.digest)
        else:
            stream = await self.upstream.open_blob(self.name, self.digest)
        while True:
            self.source = stream.source
            self._sized(stream)
            before = self.written
            reader = _FillProtocol(self, self.written - stream.start, self.clock, stream.idle, stream.source,
                                   self.floor)
            stream.deliver(reader)
            try:
                await reader.done
            except UpstreamError as e:
                # Too slow is no progress: a dripping upstream is given up
                # after a few windows, not resumed for ever.
                slow = isinstance(e, SlowUpstream)
                stalled = 0 if self.written > before and not slow else stalled + 1
                if stalled >= self.MAX_STALLED_RESUMES or self.size is None:
                    raise
                self.resumes += 1
                self.log.warn(
                    "Resuming {digest} at byte {offset} after: {error}",
                    digest=str(self.digest), offset=self.written, error=str(e),
                )
            else:
                if self.size is None:
                    self.size = self.written
                    return
                if self.written >= self.size:
                    return
                stalled = 0 if self.written > before else stalled + 1
                if stalled >= self.MAX_STALLED_RESUMES:
                    raise UpstreamError(f"upstream {stream.source} keeps ending the blob {self.digest} early")
            # The upstream that sent the bytes so far sends the rest.
            stream = await stream.resume(self.written)
            if (self.shared is not None and self.shared.sent(self.source)
                    and not self.shared.sent(stream.source)):
                # Upstream after the bucket (once a fill at most) has
                # stalls of its own to spend: the bucket's are not held
                # against it.
                stalled = 0

    def _sized(self, stream: BlobStream) -> None:
        """
        Learn the blob's size from the first stream that tells it, and
        refuse (giving up its connection) a stream that tells another.
        """
        try:
            if self.size is None and stream.total is not None:
                self.size = stream.total
                self._writer.reserve(stream.total)
                self._fire_started()
            elif stream.total is not None and stream.total != self.size:
                raise IntegrityError(f"upstream changed the size of {self.digest}")
        except Exception:
            stream.abandon()
            raise


@dataclass(frozen=True)
class FillProgress:
    """
    One download under way, as the status page shows it: ``bytes`` written
    so far of ``total`` (None until upstream said), and the ``clients``
    following it.
    """

    digest: str
    repository: str
    upstream: str
    bytes: int
    total: Optional[int]
    clients: int


class Fills:
    """
    The blob downloads under way, one per digest.
    """

    log = Logger()

    def __init__(self, store, clock, metrics, floor: RateFloor = RateFloor(), shared=None):
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.floor = floor
        self.shared = shared
        self._fills: Dict[Digest, Fill] = {}
        self._running: Dict[Digest, Deferred] = {}
        metrics.inflight.set_function(lambda: len(self._fills))
        metrics.inflight_clients.set_function(lambda: sum(f.clients for f in self._fills.values()))

    def __len__(self) -> int:
        return len(self._fills)

    def get(self, digest: Digest) -> Optional[Fill]:
        return self._fills.get(digest)

    def progress(self) -> List[FillProgress]:
        """
        A read-only view of the downloads under way.  Every client reading
        a blob pins it (regcache.index), so the pins on a digest being
        downloaded are its clients, but for the one its writer holds while
        it commits, once verified.
        """
        pins = self.store.index.pins
        return [
            FillProgress(str(f.digest), f.name, f.upstream.key, f.written, f.size,
                         pins.get(f.digest, 0) - (1 if f.verified else 0))
            for f in self._fills.values()
        ]

    def start(self, upstream: Remote, name: str, digest: Digest) -> Fill:
        fill = Fill(upstream, name, digest, self.store, self.clock, self.metrics, self.floor, self.shared)
        self._fills[digest] = fill
        started = self.clock.seconds()
        d = Deferred.fromCoroutine(fill.run())
        self._running[digest] = d
        d.addBoth(self._ended, fill, started)
        return fill

    def _ended(self, result, fill: Fill, started: float) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]
            self._running.pop(fill.digest, None)
        # One event per download, whatever its end, with the fields of an
        # upstream fetch (docs/logs.md): the per-request "upstream" events
        # end at the headers; this one has the bytes.
        fields = dict(event="fill", kind="blob", digest=str(fill.digest), upstream=fill.upstream.key,
                      member=fill.source, bytes=fill.written, size=fill.size,
                      duration=self.clock.seconds() - started, resumes=fill.resumes,
                      error=result.getErrorMessage() if isinstance(result, Failure) else None)
        if isinstance(result, Failure) and fill.verified:
            self.log.warn(
                "Blob fill verified but not stored: {digest} from {upstream}, {bytes} bytes in {duration:.3f}s: "
                "{error}; its clients were served, the next request downloads it again",
                outcome="unstored", **fields,
            )
        elif isinstance(result, Failure):
            self.log.warn(
                "Blob fill failed: {digest} from {upstream} after {bytes} bytes, {duration:.3f}s: {error}",
                outcome="failed", **fields,
            )
        else:
            self.log.info(
                "Blob fill landed: {digest} from {upstream}, {bytes} bytes in {duration:.3f}s, {resumes} resumes",
                outcome="landed", **fields,
            )

    def drain(self) -> Deferred:
        """
        A Deferred that fires when every fill under way has ended.
        """
        from twisted.internet.defer import DeferredList

        waits = []
        for d in self._running.values():
            w: Deferred = Deferred()
            d.addBoth(lambda r, w=w: (w.callback(None), r)[1])
            waits.append(w)
        if self.shared is not None:
            # A fill that landed may still be going up to the bucket: a
            # restart that drops it leaves the blob in neither level.
            waits.append(DeferredList(waits).addCallback(lambda _: self.shared.uploads()))
        return DeferredList(waits)


class FillDrain(Service):
    """
    On shutdown, wait (briefly) for blob downloads under way, so a rolling
    restart does not throw away a nearly finished fill.
    """

    log = Logger()

    def __init__(self, fills, reactor, grace: float = 10.0):
        self.fills = fills
        self.reactor = reactor
        self.grace = grace

    def stopService(self):
        super().stopService()
        if not len(self.fills):
            return None
        d = self.fills.drain().addTimeout(self.grace, self.reactor)
        d.addErrback(self._unfinished)
        return d

    def _unfinished(self, failure: Failure) -> None:
        """Running out of grace is the expected way to give up; anything else is a bug to see."""
        if failure.check(TimeoutError):
            self.log.info("Stopping with {count} blob fills unfinished after {grace}s",
                          count=len(self.fills), grace=self.grace)
        else:
            self.log.failure("Waiting for blob fills to finish failed", failure)
