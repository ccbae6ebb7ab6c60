"""
Small in-memory pieces for unit tests: an upstream whose blob bodies the
test feeds by hand, and a client connection to a Site over StringTransport.

They let a test stop time between any two chunks of a download and look at
what every client has received, which no real network allows.
"""

import contextlib
import errno
import hashlib
import os
import subprocess
import tempfile
import unittest

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from regcache.errors import UpstreamNotFound
from regcache.inflight import Fills
from regcache.metrics import Metrics
from regcache.mirror import Mirror
from regcache.policy import Policy
from regcache.reference import Digest
from regcache.routes import RegistryRoutes
from regcache.service import RegcacheSite
from regcache.store import Store
from regcache.tags import TagMap
from regcache.upstream import Timeouts


def inline(f, *args):
    """Run 'blocking' store work inline: unit tests have no threads."""
    try:
        return succeed(f(*args))
    except Exception:
        from twisted.internet.defer import fail

        return fail()


class FedBody:
    """
    An upstream blob response whose body the test delivers chunk by chunk.
    """

    def __init__(self, code=200, headers=None):
        self.code = code
        self.headers = Headers(headers or {})
        self.protocol = None
        self.transport = StringTransport()

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def feed(self, data: bytes):
        self.protocol.dataReceived(data)

    def end(self):
        self.protocol.connectionLost(Failure(ResponseDone()))

    def die(self):
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionError("reset"))])))


class HandFedUpstream:
    """
    Stands in for regcache.upstream.Upstream: every open_blob call is
    recorded and answered when the test says so.
    """

    key = "hand-fed"
    timeouts = Timeouts(idle=30)

    def __init__(self):
        self.calls = []  # (name, digest, offset, Deferred)

    def repository(self, name):
        return name

    def open_blob(self, name, digest, offset=0):
        d = Deferred()
        self.calls.append((name, digest, offset, d))
        return d

    def answer(self, i, body):
        self.calls[i][3].callback(body)

    def missing(self, i):
        self.calls[i][3].errback(UpstreamNotFound("blob"))


def blob(size: int, seed: bytes = b"x"):
    data = hashlib.shake_256(seed).digest(size)
    return data, Digest("sha256", hashlib.sha256(data).hexdigest())


def conformance_cases(data: bytes):
    """
    PROTOCOL.md §6's Range table on ``data`` (2048 bytes there): (Range,
    status, Content-Range, body) for each row.
    """
    n = len(data)
    return [
        ("bytes=500-1499", 206, f"bytes 500-1499/{n}", data[500:1500]),
        ("bytes=500-", 206, f"bytes 500-{n - 1}/{n}", data[500:]),
        ("bytes=-500", 206, f"bytes {n - 500}-{n - 1}/{n}", data[-500:]),
        ("bytes=2000-5000", 206, f"bytes 2000-{n - 1}/{n}", data[2000:]),
        ("bytes=500-0", 416, f"bytes */{n}", b""),
        ("bytes=5000-10000", 416, f"bytes */{n}", b""),
    ]


class Rig:
    """
    The real routes, mirror, fills and store over a hand-fed upstream, on a
    MemoryReactorClock.
    """

    def __init__(self, upstream=None, root=None):
        self.root = root or tempfile.mkdtemp(prefix="regcache-test-")
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics()
        self.store = Store(self.root, inline, self.reactor.seconds)
        self.store.prepare()
        self.upstream = upstream or HandFedUpstream()
        self.policy = Policy([self.upstream], self.reactor, 60, None)
        self.fills = Fills(self.store, self.reactor, self.metrics)
        self.mirror = Mirror(self.store, TagMap(self.root), self.fills, self.policy, self.metrics, self.reactor)
        self.routes = RegistryRoutes(self.mirror, self.policy, self.metrics, self.reactor)
        self.site = RegcacheSite(self.routes.app.resource(), self.metrics, self.reactor)

    def client(self, path: str, method: str = "GET", headers=None) -> "Client":
        return Client(self.site, path, method, headers or {})

    def blob_file(self, digest):
        path = self.store.blob_path(digest)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    def temp_files(self):
        return os.listdir(self.store.tmp_dir)


class Client:
    """
    One HTTP/1.1 connection to the site, over a StringTransport.
    """

    def __init__(self, site, path, method, headers):
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: mirror.test"]
        for k, vs in headers.items():
            for v in vs if isinstance(vs, list) else [vs]:
                lines.append(f"{k}: {v}")
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())

    def raw(self) -> bytes:
        return self.transport.value()

    def status(self) -> int:
        return int(self.raw().split(b" ", 2)[1])

    def header(self, name: str):
        head = self.raw().split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None

    def body(self) -> bytes:
        return self.raw().split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.raw() else b""

    def aborted(self) -> bool:
        """StringTransport.abortConnection sets ``disconnected``; a clean end does not."""
        return bool(self.transport.disconnected)

    def slow_down(self):
        """The client's socket buffer is full."""
        self.channel.pauseProducing()

    def speed_up(self):
        self.channel.resumeProducing()

    def hang_up(self):
        self.channel.connectionLost(Failure(ConnectionError("client went away")))


@contextlib.contextmanager
def small_filesystem(size: str):
    """
    A tmpfs of ``size`` (e.g. ``"256k"``) mounted on a fresh directory for
    the block, unmounted after.  Needs root; skips the test with the reason
    when mounting is impossible here.
    """
    path = tempfile.mkdtemp(prefix="regcache-smallfs-")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(path)
        raise unittest.SkipTest(f"cannot mount a {size} tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)
        os.rmdir(path)


def fill_up(path: str) -> None:
    """Write a filler file until the filesystem at ``path`` is full."""
    fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
