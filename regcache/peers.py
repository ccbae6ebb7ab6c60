# test-case-name: tests.test_peers,tests.integration.test_leases_proc
"""
Forwarding between replicas: a replica that lost the lease on a blob to a
live holder (regcache.leases) gets the bytes from that holder, one HTTP hop.

The requester opens ``GET <holder>/_regcache/blobs/<digest>`` with
PEER_HEADER, an HMAC of a timestamp and the digest under a key derived from
the bucket's secret key, which every replica has and no client does.  The
holder serves only from its own fill in flight (while it holds the lease) or
from its local store, Range included, as any blob GET: it never starts a
fetch, asks the bucket or forwards again, so a request can never go round
in circles; it answers 404 when it has neither.  The route skips client
authentication and the pull policy (the requester checked both before it
asked) but not the limits every client connection has.  A signature is good
for MAX_SKEW seconds either way: a copy replayed within that gets the same
bytes its first sender could have, nothing more.

The requester's fill verifies the bytes as it would upstream's.
"""

import hashlib
import hmac
import re
import socket
from typing import Awaitable, Callable, Optional, Tuple

from twisted.internet.defer import CancelledError, TimeoutError

from regcache.body import Source
from regcache.errors import RegistryError, UpstreamError, in_words
from regcache.exchange import abandon
from regcache.mirror import BlobAnswer
from regcache.reference import Digest
from regcache.remote import BlobStream
from regcache.upstream import blob_stream

PEER_HEADER = "X-Regcache-Peer"
PEER_PATH = "/_regcache/blobs/"

#: Seconds a signature is good for, either side of its timestamp: what
#: replicas' clocks may disagree by, plus a request's way across.
MAX_SKEW = 60.0

#: Seconds a holder has to answer with headers: it may be waiting on its
#: own upstream's first answer, with its retries (upstream.Timeouts).
HEADER_TIMEOUT = 30.0

#: Seconds a forwarded body may stall: longer than the holder's own idle
#: timeout, so that its upstream stalling and resuming does not end ours.
IDLE_TIMEOUT = 30.0

_SIGNATURE = re.compile(r"(\d{1,12}):([0-9a-f]{64})")


def peer_key(secret_key: str) -> bytes:
    """The forwarding key: derived, so the bucket's secret itself never goes over the wire or into a MAC."""
    return hmac.new(secret_key.encode("utf-8"), b"regcache peer forwarding v1", hashlib.sha256).digest()


class PeerAuth:
    """Signs and checks PEER_HEADER under one key."""

    def __init__(self, key: bytes, clock):
        self._key = key
        self._clock = clock

    def _mac(self, stamp: str, digest) -> str:
        return hmac.new(self._key, f"{stamp}:{digest}".encode("ascii"), hashlib.sha256).hexdigest()

    def sign(self, digest: Digest) -> str:
        stamp = str(int(self._clock.seconds()))
        return f"{stamp}:{self._mac(stamp, digest)}"

    def problem(self, value: Optional[bytes], digest: str) -> Optional[str]:
        """None if ``value`` is a good signature of ``digest`` (as the path names it), else what is wrong."""
        if value is None:
            return f"{PEER_HEADER} is missing"
        m = _SIGNATURE.fullmatch(value.decode("latin-1"))
        if m is None:
            return f"{PEER_HEADER} is malformed"
        if abs(self._clock.seconds() - int(m.group(1))) > MAX_SKEW:
            return f"{PEER_HEADER} is too old or too new"
        if not hmac.compare_digest(self._mac(m.group(1), digest), m.group(2)):
            return f"{PEER_HEADER} does not match"
        return None


class PeerError(Exception):
    """A holder that could not send the blob: refused, 404, late or broken."""


class Peers:
    """The requesting side: ``http`` a treq HTTPClient of its own (pooled)."""

    def __init__(self, http, auth: PeerAuth, reactor, metrics, header_timeout: float = HEADER_TIMEOUT,
                 idle: float = IDLE_TIMEOUT):
        self._http = http
        self._auth = auth
        self._reactor = reactor
        self.metrics = metrics
        self.header_timeout = header_timeout
        self.idle = idle

    async def open(self, holder: str, digest: Digest, start: int,
                   resume: Callable[[int], Awaitable[BlobStream]]) -> BlobStream:
        """The holder's bytes of ``digest`` from ``start``, its body unread; PeerError if it cannot send them."""
        try:
            stream = await self._open(holder, digest, start, resume)
        except PeerError:
            self.metrics.forwards.labels("sent", "failed").inc()
            raise
        self.metrics.forwards.labels("sent", "ok").inc()
        return stream

    async def _open(self, holder: str, digest: Digest, start: int, resume) -> BlobStream:
        headers = {PEER_HEADER.encode(): [self._auth.sign(digest).encode("ascii")]}
        if start:
            headers[b"Range"] = [f"bytes={start}-".encode("ascii")]
        d = self._http.request("GET", holder + PEER_PATH + str(digest), headers=headers, unbuffered=True,
                               allow_redirects=False)
        d.addTimeout(self.header_timeout, self._reactor)
        try:
            response = await d
        except (TimeoutError, CancelledError):
            raise PeerError(f"{holder} did not answer within {self.header_timeout:g}s")
        except Exception as e:
            raise PeerError(in_words(holder, e))
        if response.code not in (200, 206):
            abandon(response)
            raise PeerError(f"{holder} answered {response.code}")
        try:
            return blob_stream(response, start, f"peer {holder}", self.idle, resume)
        except UpstreamError as e:
            raise PeerError(str(e))


class PeerBlobs:
    """
    The holder's side of the peer route: a blob from the fill this replica
    reads from upstream itself (``coordinator.fetching``), or from its store.
    """

    def __init__(self, auth: PeerAuth, store, fills, coordinator, metrics):
        self.auth = auth
        self.store = store
        self.fills = fills
        self.coordinator = coordinator
        self.metrics = metrics

    async def answer(self, request, reference: str) -> Tuple[Digest, BlobAnswer]:
        """The blob ``reference`` names, once the request is known to come from a replica."""
        problem = self.auth.problem(request.getHeader(PEER_HEADER.encode("ascii")), reference)
        if problem is not None:
            self.metrics.forwards.labels("served", "denied").inc()
            raise RegistryError("DENIED", f"not a request from a replica: {problem}", status=403)
        digest = Digest.parse(reference)
        return digest, await self._held(digest)

    async def _held(self, digest: Digest) -> BlobAnswer:
        for _ in range(3):
            opened = self._open(self.store.open_blob, digest)
            if opened is not None:
                fd, size = opened
                self.metrics.forwards.labels("served", "ok").inc()
                return BlobAnswer(size, fd, Source(size), "peer", self.store.pin(digest))
            fill = self.fills.get(digest)
            if fill is None or not self.coordinator.fetching(digest):
                break
            try:
                size = await fill.wait_started()
            except Exception as e:
                self.metrics.forwards.labels("served", "failed").inc()
                raise RegistryError("UNAVAILABLE", f"the download of {digest} failed: {e}", status=502)
            fd = self._open(fill.reader)
            if fd is not None:
                self.metrics.forwards.labels("served", "ok").inc()
                return BlobAnswer(size, fd, fill, "peer", self.store.pin(digest))
            # The fill moved into the store meanwhile: open it there.
        self.metrics.forwards.labels("served", "missing").inc()
        raise RegistryError("BLOB_UNKNOWN", f"this replica neither holds nor downloads {digest}")

    def _open(self, open_, *args):
        try:
            return open_(*args)
        except OSError as e:
            self.metrics.forwards.labels("served", "failed").inc()
            raise RegistryError("UNAVAILABLE", f"cannot open the blob now: {e.strerror}", status=503)


def default_advertise(listen: str) -> Optional[str]:
    """
    The URL peers reach this replica at when --advertise is not given: this
    host's address (as its name resolves: a pod's IP on Kubernetes) and the
    port ``listen`` (a Twisted endpoint) names; None if it names none or
    the host's name does not resolve.  Resolved once, at start-up.
    """
    m = re.match(r"(tcp6?|ssl):(?:port=)?(\d+)", listen)
    if m is None:
        return None
    scheme = "https" if m.group(1) == "ssl" else "http"
    try:
        host = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return f"{scheme}://{host}:{m.group(2)}"
