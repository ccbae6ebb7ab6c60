"""
Sending a span of a blob file to one client, cached or still downloading.

Two senders share one contract: send bytes [start, end) of a file
descriptor, never past what the source says is readable, wait for more when
caught up, abort the connection if the source fails, and fire ``done`` once
the last byte is handed to the kernel.

- On a plain TCP connection the kernel copies file to socket with
  ``os.sendfile``: no bytes pass through Python, which is what lets warm hits
  keep up with nginx.
- Anything else (TLS, or a test transport) gets a push producer that reads
  chunks with ``pread`` and pauses when the client's buffer is full.

Either way each client has its own position and its own backpressure, so
memory stays bounded and a slow client slows nobody else.
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
    cached blob is all readable at once; a Fill grows (see inflight.Fill).
    """

    failure: Optional[Exception] = None

    def __init__(self, size: int):
        self.size = size

    def readable(self) -> int:
        return self.size

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


def send(request, fd: int, start: int, end: int, source, reactor, metrics) -> Deferred:
    """
    Send [start, end) of ``fd`` as the body of ``request``, whose headers
    (with Content-Length) are set.  Takes ownership of ``fd``.  The returned
    Deferred fires when done; cancelling it (Klein does, when the client
    hangs up) stops the sender and closes the descriptor.
    """
    transport = request.channel.transport
    if _sendfile_ok(transport, reactor):
        sender = _SendfileSender(request, transport, fd, start, end, source, reactor, metrics)
    else:
        sender = _ChunkSender(request, fd, start, end, source, metrics)
    return sender.start()


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

    def __init__(self, request, fd: int, start: int, end: int, source, metrics):
        self.request = request
        self.fd = fd
        self.pos = start
        self.end = end
        self.source = source
        self.metrics = metrics
        self.done: Deferred = Deferred(lambda d: self._close())
        self._closed = False
        self._unsubscribe: Optional[Callable[[], None]] = None

    def _limit(self) -> int:
        return min(self.end, self.source.readable())

    def _wait(self) -> None:
        """
        Caught up with a growing file: sleep until the source has more.
        """
        if self._unsubscribe is None:
            self._unsubscribe = self.source.subscribe(self._more)

    def _more(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._resume()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._release()
        os.close(self.fd)

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
        self.request.write(b"")  # the headers go out now, even before any byte exists
        self.request.registerProducer(self, True)
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
            if self.source.failure is not None:
                return self._abort()
            if self.pos >= self.end:
                return self._finish()
            limit = self._limit()
            if self.pos >= limit:
                return self._wait()
            data = os.pread(self.fd, min(CHUNK, limit - self.pos), self.pos)
            if not data:
                self.log.error("Blob file ended early at byte {pos}", pos=self.pos)
                return self._abort()
            self.pos += len(data)
            self.metrics.served_bytes.labels("read").inc(len(data))
            self.request.write(data)


@implementer(IWriteDescriptor)
class _SendfileSender(_Sender):
    """
    Registers a duplicate of the connection's socket descriptor as a writer
    of its own, so the reactor says when the socket can take more, and then
    lets the kernel copy straight from the file.
    """

    def __init__(self, request, transport, fd, start, end, source, reactor, metrics):
        super().__init__(request, fd, start, end, source, metrics)
        self.transport = transport
        self.reactor = reactor
        self.sock = -1
        self._writing = False

    def start(self) -> Deferred:
        self.request.write(b"")  # the headers, into the transport's buffer
        self.sock = os.dup(self.transport.fileno())
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
        if self.source.failure is not None:
            return self._abort()
        if self.pos >= self.end:
            return self._finish()
        if _pending(self.transport):
            return
        limit = self._limit()
        if self.pos >= limit:
            self._writing = False
            self.reactor.removeWriter(self)
            return self._wait()
        try:
            sent = os.sendfile(self.sock, self.fd, self.pos, min(SENDFILE_MAX, limit - self.pos))
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
        self.request.sentLength += sent
        self.metrics.served_bytes.labels("sendfile").inc(sent)
        if self.pos >= self.end:
            self._finish()


class Unsatisfiable(Exception):
    """A Range that selects no byte of the blob: answered with 416."""


def parse_range(value: Optional[bytes], size: int) -> Optional[tuple]:
    """
    The one span [start, end) a ``Range`` header asks for, or None for the
    whole blob: no header, a header regcache does not understand, or several
    ranges (answered with the full body, which RFC 9110 allows and every
    client accepts).  Raises Unsatisfiable for a range past the end.
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
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable()
        return max(size - n, 0), size
    start = int(first)
    end = int(last) + 1 if last else size
    if last and int(last) < start:
        raise Unsatisfiable()
    if start >= size:
        raise Unsatisfiable()
    return start, min(end, size)