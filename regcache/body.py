"""
Sending a span of a blob file to one client, cached or still downloading.

Two senders share one contract: send bytes [start, end) of a file
descriptor, never past what the source says is readable, wait for more when
caught up, abort the connection if the source fails, and fire ``done`` once
the last byte is handed to the kernel.

No response completes with bytes that were not verified.  A client that got
every byte of a Content-Length response believes it got them right, so the
last byte of every span (the whole blob or any Range of it) waits until the
source is ``verified``, and a failure aborts the connection one byte short.
An empty span has no byte to hold back, and its headers alone would be a
complete answer: it sends them only once verified.

- On a plain TCP connection the kernel copies file to socket with
  ``os.sendfile``: no bytes pass through Python, which is what lets warm hits
  keep up with nginx.
- Anything else (TLS, or a test transport) gets a push producer that reads
  chunks with ``pread`` and pauses when the client's buffer is full.

Either way each client has its own position and its own backpressure, so
memory stays bounded and a slow client slows nobody else.  A client that
takes no bytes at all for the site's ``progress_timeout`` (while bytes are
there to take) is disconnected, which gives back its descriptors and the pin
on the blob: Twisted's idle timer sleeps while a response is under way.
"""

import os
from typing import Callable, Optional

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorFDSet, IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

CHUNK = 256 * 1024
#: The most one sendfile call may send.  On loopback a call runs until the
#: receiver's buffers are full, several MiB and milliseconds, with the reactor
#: waiting.  2 MiB (nginx's sendfile_max_chunk) kept one stream's speed and
#: halved the p99 of manifest requests served during 8 blob streams, against
#: 8 MiB; 1 MiB cost a third of one stream's speed (bench/README.md).
SENDFILE_MAX = 2 * 1024 * 1024


class Source:
    """
    What a sender needs to know about the bytes behind its descriptor.  A
    cached blob is all readable and verified at once; a Fill grows, and is
    verified only once all of it matched its digest (see inflight.Fill).
    """

    failure: Optional[Exception] = None
    verified = True

    def __init__(self, size: int):
        self.size = size

    def readable(self) -> int:
        return self.size

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


def send(request, blob, start: int, end: int, reactor, metrics) -> Deferred:
    """
    Send [start, end) of an open blob (``fd``, ``source`` and ``release``,
    see mirror.BlobAnswer) as the body of ``request``, whose headers (with
    Content-Length) are set.  The returned Deferred fires when done;
    cancelling it (Klein does, when the client hangs up) stops the sender.
    The sender releases the blob when it stops, and the caller releases it
    too once the Deferred is done with: releasing is idempotent, so the
    descriptor is closed on every path, including one where starting fails.
    """
    transport = request.channel.transport
    if _sendfile_ok(transport, reactor):
        sender = _SendfileSender(request, transport, blob, start, end, reactor, metrics)
    else:
        sender = _ChunkSender(request, blob, start, end, reactor, metrics)
    try:
        return sender.start()
    except BaseException:
        sender._close()
        raise


def _sendfile_ok(transport, reactor) -> bool:
    return (
        hasattr(os, "sendfile")
        and isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and hasattr(transport, "dataBuffer")
        and IReactorFDSet.providedBy(reactor)
    )


def _pending(transport) -> int:
    """
    Bytes the transport still holds (our headers): they must be on the wire
    before sendfile writes to the socket behind its back.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class _Sender:
    log = Logger()

    def __init__(self, request, blob, start: int, end: int, reactor, metrics):
        self.request = request
        self.blob = blob
        self.fd = blob.fd
        self.pos = start
        self.end = end
        self.source = blob.source
        self.reactor = reactor
        self.metrics = metrics
        self.done: Deferred = Deferred(lambda d: self._close())
        self._closed = False
        self._unsubscribe: Optional[Callable[[], None]] = None
        site = getattr(request.channel, "site", None)
        limits = getattr(site, "limits", None)
        self._patience = limits.progress_timeout if limits is not None else None
        self._stall = None
        self._moved = False

    def _progress(self) -> None:
        """
        Bytes went to the client.  A flag, not a new timer per chunk: the
        timer looks at it when it fires, so a stall is noticed between one
        and two ``progress_timeout`` after the last byte.
        """
        self._moved = True

    def _watch(self) -> None:
        """Start (or go on) watching for a client that takes nothing."""
        if self._patience and not self._closed and self._stall is None:
            self._moved = False
            self._stall = self.reactor.callLater(self._patience, self._check)

    def _check(self) -> None:
        self._stall = None
        if self._moved:
            self._watch()
        else:
            self._stalled()

    def _still(self) -> None:
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        channel = self.request.channel
        if channel is None:
            return
        self.log.info("Dropping a client that took no bytes of {what} in {seconds} s",
                      what=self.request.path.decode("latin-1"), seconds=self._patience)
        channel.site.tripped("progress_timeout", channel)
        self._abort()

    def _ready(self) -> int:
        """
        How many bytes may go now.  When none may, it has already done what
        comes instead: aborted (the source failed), finished (the span is
        sent and verified) or gone to sleep until the source moves on.
        """
        if self.source.failure is not None:
            self._abort()
            return 0
        verified = self.source.verified
        if self.pos >= self.end and verified:
            self._finish()
            return 0
        limit = min(self.end if verified else self.end - 1, self.source.readable())
        if self.pos >= limit:
            self._wait()
            return 0
        return limit - self.pos

    def _headers(self) -> None:
        """The headers go out now, before any byte exists, unless they would be a whole answer."""
        if self.pos < self.end or self.source.verified:
            self.request.write(b"")

    def _wait(self) -> None:
        """
        Caught up with a growing file: sleep until the source has more.
        """
        # Waiting on the download, not on the client: the fill has
        # deadlines of its own.
        self._still()
        if self._unsubscribe is None:
            self._unsubscribe = self.source.subscribe(self._more)

    def _more(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._watch()
        self._resume()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._still()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        try:
            self._release()
        finally:
            self.blob.release()

    def _finish(self) -> None:
        self._close()
        self.done.callback(None)

    def _abort(self) -> None:
        """
        The source failed: end the connection without a clean end of body,
        so the client knows its copy is incomplete.  ``done`` is left to be
        cancelled when the connection is gone.
        """
        transport = self.request.channel.transport if self.request.channel else None
        self._close()
        if transport is not None:
            transport.abortConnection()

    def _release(self) -> None:
        """Undo whatever the sender registered."""

    def _resume(self) -> None:
        raise NotImplementedError


@implementer(IPushProducer)
class _ChunkSender(_Sender):
    paused = False

    def start(self) -> Deferred:
        self._headers()
        self.request.registerProducer(self, True)
        self._watch()
        self._resume()
        return self.done

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._resume()

    def stopProducing(self) -> None:
        self._close()

    def _release(self) -> None:
        if self.request.producer is self and self.request.channel is not None:
            self.request.unregisterProducer()

    def _resume(self) -> None:
        while not self.paused and not self._closed:
            n = self._ready()
            if not n:
                return
            data = os.pread(self.fd, min(CHUNK, n), self.pos)
            if not data:
                self.log.error("Blob file ended early at byte {pos}", pos=self.pos)
                return self._abort()
            self.pos += len(data)
            self.metrics.served_bytes.labels("read").inc(len(data))
            self._progress()
            self.request.write(data)


@implementer(IWriteDescriptor)
class _SendfileSender(_Sender):
    """
    Registers a duplicate of the connection's socket descriptor as a writer
    of its own, so the reactor says when the socket can take more, and then
    lets the kernel copy straight from the file.
    """

    def __init__(self, request, transport, blob, start, end, reactor, metrics):
        super().__init__(request, blob, start, end, reactor, metrics)
        self.transport = transport
        self.sock = -1
        self._writing = False

    def start(self) -> Deferred:
        self._headers()  # into the transport's buffer, flushed before any sendfile
        self.sock = os.dup(self.transport.fileno())
        self._watch()
        self._resume()
        return self.done

    def fileno(self) -> int:
        return self.sock

    def logPrefix(self) -> str:
        return "sendfile"

    def connectionLost(self, reason) -> None:
        self._close()

    def _resume(self) -> None:
        if not self._writing and not self._closed:
            self._writing = True
            self.reactor.addWriter(self)

    def _wait(self) -> None:
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)
        super()._wait()

    def _release(self) -> None:
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)
        if self.sock != -1:
            os.close(self.sock)
            self.sock = -1

    def doWrite(self) -> None:
        if self._closed:
            return
        n = self._ready()
        if not n or _pending(self.transport):
            return
        try:
            sent = os.sendfile(self.sock, self.fd, self.pos, min(SENDFILE_MAX, n))
        except BlockingIOError:
            return
        except OSError:
            # The client went away; its connection's own reader sees that
            # too, and Klein then cancels ``done``.
            return self._close()
        if sent == 0:
            self.log.error("Blob file ended early at byte {pos}", pos=self.pos)
            return self._abort()
        self.pos += sent
        self._progress()
        self.request.sentLength += sent
        self.metrics.served_bytes.labels("sendfile").inc(sent)
        if self.pos >= self.end and self.source.verified:
            # Done now, not at the next writable event: a client that has
            # every byte may hang up first, and the response would then end
            # as a lost connection, never logged or counted.
            self._finish()


class Unsatisfiable(Exception):
    """A Range that selects no byte of the blob: answered with 416."""


def parse_range(value: Optional[bytes], size: int) -> Optional[tuple]:
    """
    The one span [start, end) a ``Range`` header asks for, or None for the
    whole blob.

    - No header, a header regcache cannot read (another unit, anything but
      digits around one dash, bytes that are not ASCII) or several ranges:
      None, answered with the full body, which RFC 9110 §14.2 allows ("a
      server MAY ignore the Range header field") and every client accepts.
    - A start at or past the end, or a suffix of 0 bytes: Unsatisfiable.
    - An inverted range (``bytes=5-3``: invalid by §14.1.1), Unsatisfiable
      too.  §14.2 lets a server "ignore or reject" an invalid range; the
      distribution-spec conformance suite (PROTOCOL.md §6) demands a 416 for
      ``bytes=500-0``, and where the two differ the suite decides.  So every
      inverted range is rejected alike: one rule, not one per example.
    - Positions past the end clip to it, however many digits they have.
    """
    if not value:
        return None
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    unit, _, spec = text.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        n = _position(last, size)
        if n == 0 or size == 0:
            raise Unsatisfiable()
        return size - n, size
    start = _position(first, size)
    if last and _position(last, size) < start:
        raise Unsatisfiable()
    if start >= size:
        raise Unsatisfiable()
    end = _position(last, size) + 1 if last else size
    return start, min(end, size)


def _position(digits: str, size: int) -> int:
    """
    A position of the header, capped at ``size``: every position past the
    end means the same, and ``int()`` refuses more than 4,300 digits.
    """
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(size)):
        return size
    return min(int(digits), size)
