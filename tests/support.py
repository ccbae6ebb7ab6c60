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

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from regcache.accounting import Accounting
from regcache.clientauth import Gate
from regcache.errors import UpstreamError, UpstreamNotFound
from regcache.inflight import Fills
from regcache.metrics import Metrics
from regcache.mirror import Mirror
from regcache.policy import Policy, Registry
from regcache.readiness import Readiness
from regcache.redirect import Redirects
from regcache.referrers import ReferrersCache
from regcache.reference import Digest
from regcache.remote import MemberHealth
from regcache.routes import RegistryRoutes
from regcache.rules import PullRules
from regcache.shared import SharedLevel
from regcache.sharedmeta import SharedMeta
from regcache.site import RegcacheSite
from regcache.status import Status
from regcache.store import Store
from regcache.tags import TagMap
from regcache.upstream import Timeouts, blob_stream


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
        from twisted.web.iweb import UNKNOWN_LENGTH

        self.code = code
        self.headers = Headers(headers or {})
        # As twisted.web.client does: Content-Length leaves the headers and
        # becomes ``length``.
        lengths = self.headers.getRawHeaders(b"content-length")
        self.headers.removeHeader(b"content-length")
        self.length = int(lengths[0]) if lengths else UNKNOWN_LENGTH
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
    A regcache.remote.Remote whose blob answers the test gives by hand:
    every open_blob, resume and head_blob is recorded and answered when the
    test says so.  Its answers are FedBody responses read by upstream.py's
    own blob_stream, so a fill meets the same streams, checks and refusals
    as with the real client.
    """

    key = "hand-fed"
    #: The idle timeout its streams carry.
    idle = 30.0

    def __init__(self):
        self.calls = []  # (name, digest, offset, Deferred)
        self.heads = []  # (name, digest, Deferred)

    def repository(self, name):
        return name

    def head_manifest(self, name, reference, accept, retry=False):
        raise NotImplementedError("hand-fed upstreams serve blobs only")

    def get_manifest(self, name, reference, accept, expect=None, retry=False):
        raise NotImplementedError("hand-fed upstreams serve blobs only")

    def tags_list(self, name, query):
        raise NotImplementedError("hand-fed upstreams serve blobs only")

    def referrers(self, name, digest, artifact_type=None, retry=False):
        raise NotImplementedError("hand-fed upstreams serve blobs only")

    def health(self):
        return [MemberHealth(self.key, "up")]

    def open_blob(self, name, digest):
        return self._open(name, digest, 0)

    def _open(self, name, digest, offset):
        d = Deferred()
        self.calls.append((name, digest, offset, d))
        return d

    def head_blob(self, name, digest):
        d = Deferred()
        self.heads.append((name, digest, d))
        return d

    def answer(self, i, body):
        """Answer call ``i`` with the response ``body`` (a FedBody), refused as upstream.py refuses it."""
        name, digest, offset, d = self.calls[i]
        resume = lambda at: self._open(name, digest, at)
        try:
            stream = blob_stream(body, offset, self.key, self.idle, resume)
        except UpstreamError:
            d.errback()
            return
        d.callback(stream)

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

    def __init__(self, upstream=None, tag_ttl=60, max_stale=None, root=None, hosts=("docker.io",), others=(),
                 revalidate_deadline=0.3, auth=None, auth_run=inline, bucket=None, shared=None, redirect=None,
                 uses=None):
        """
        ``upstream`` answers for ``hosts`` and is the default; ``others``
        are more regcache.policy.Registry entries, as a config file's
        further upstreams.  ``auth`` (a config.AuthSettings) turns client
        authentication on, its password checks run by ``auth_run``.
        ``bucket`` (an S3, or tests.test_shared's FakeBucket) is the shared
        level, as ``--storage-backend s3`` makes one: rigs given the same
        bucket are replicas of one deployment.
        ``shared(reactor, store, metrics)`` makes the shared level
        (regcache.shared) behind the store; ``redirect`` is then the expiry
        of redirects to its bucket (regcache.redirect), None for none.
        ``uses`` (regcache.sweeper.Uses) is told of the blobs served.
        """
        self.root = root or tempfile.mkdtemp(prefix="regcache-test-")
        self.reactor = MemoryReactorClock()
        self.accounting = Accounting(self.reactor)
        self.metrics = Metrics(self.accounting)
        self.store = Store(self.root, inline, self.reactor.seconds)
        self.store.prepare()
        self.upstream = upstream(self.reactor, self.metrics) if callable(upstream) else upstream or HandFedUpstream()
        main = Registry("docker.io", frozenset(hosts), self.upstream, tag_ttl, max_stale,
                        revalidate_deadline=revalidate_deadline)
        self.policy = Policy([main, *others], self.reactor, pulls=PullRules(metrics=self.metrics))
        if bucket is not None:
            self.shared = SharedLevel(bucket, self.store, self.metrics, self.reactor)
        else:
            self.shared = shared(self.reactor, self.store, self.metrics) if shared else None
        self.meta = SharedMeta(self.shared) if bucket is not None else None
        if self.meta is not None:
            self.store.on_link = self.meta.link
        self.fills = Fills(self.store, self.reactor, self.metrics, shared=self.shared)
        redirects = Redirects(self.shared, redirect, self.metrics, self.reactor) if redirect is not None else None
        tags = TagMap(self.root, inline, self.store.index, shared=self.meta)
        tags.count()
        referrers = ReferrersCache(self.root, inline, tags)
        self.mirror = Mirror(self.store, tags, self.fills, self.policy, self.metrics, self.reactor, referrers,
                             self.meta, redirects, uses)
        self.readiness = Readiness(self.store, inline, self.reactor)
        self.gate = Gate(auth, self.reactor, auth_run, self.metrics) if auth else None
        # Docker Hub's name, as service.py marks a Docker Hub upstream; tests
        # give it pull accounting (``status.usage``) and a limit as they need.
        self.status = Status(self.metrics, self.fills, self.policy.registries, self.reactor, None,
                             docker_hub=["docker.io"], shared=bucket is not None)
        self.routes = RegistryRoutes(self.mirror, self.policy, self.metrics, self.reactor, self.readiness.problem,
                                     self.status, gate=self.gate)
        self.site = RegcacheSite(self.routes.app.resource(), self.metrics, self.reactor)

    def client(self, path: str, method: str = "GET", headers=None, peer="192.168.1.1") -> "Client":
        return Client(self.site, path, method, headers or {}, peer)

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

    def __init__(self, site, path, method, headers, peer="192.168.1.1"):
        """``peer`` is the address the connection comes from."""
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000) if ":" not in peer
                                         else IPv6Address("TCP", peer, 40000))
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


_hub_images = {}


def hub_images():
    """Small versions of the standard images, generated once per test run."""
    if not _hub_images:
        from tests.fakes.images import moved_images, private, signature, standard_images

        root = tempfile.mkdtemp(prefix="regcache-hub-images-")
        _hub_images["current"] = standard_images(
            root, large_size=3 * 1024 * 1024, small_size=64 * 1024, multi_sizes=(32 * 1024,) * 6
        )
        _hub_images["moved"] = moved_images(root)
        _hub_images["signature"] = signature(root, _hub_images["current"]["library/small:1"])
        _hub_images["private"] = private(root, size=32 * 1024)
    return _hub_images["current"], _hub_images["moved"]


def hub_private():
    """ci/private:1, which every HubRig's fake Hub keeps in its private repository for user ci."""
    hub_images()
    return _hub_images["private"]


def hub_signature():
    """The signature of library/small:1 every HubRig's fake Hub publishes (a referrer, and its .sig tag)."""
    hub_images()
    return _hub_images["signature"]


class TreqRig(Rig):
    """
    A Rig whose upstream talks through ``self.treq`` (a StubTreq): time and
    the in-memory exchanges are stepped together.
    """

    def settle(self):
        """Let every in-memory exchange run to its end."""
        for _ in range(100):
            self.treq.flush()
            self.reactor.advance(0)

    def pass_time(self, seconds, step=0.5):
        t = 0.0
        while t < seconds:
            self.reactor.advance(step)
            self.settle()
            t += step


class HubRig(TreqRig):
    """
    The whole mirror, with the real Upstream client talking through StubTreq
    to the in-memory fake Docker Hub, everything on one MemoryReactorClock.
    """

    def __init__(self, credentials=None, tag_ttl=60, max_stale=None, timeouts=None, root=None, wrap=None,
                 revalidate_deadline=0.3, auth=None, bucket=None, **hub_options):
        from treq.testing import StubTreq

        from regcache.upstream import Upstream
        from tests.fakes.hub import FakeHub

        current, moved = hub_images()
        self.images, self.moved = current, moved
        self.signature = hub_signature()
        self.private = hub_private()
        self._credentials = credentials
        self._timeouts = timeouts or Timeouts(header=5, idle=5, attempts=3, retry_budget=10)
        self._hub_options = hub_options
        self.hub = None

        def make(reactor, metrics):
            self.hub = FakeHub(
                [*current.values(), self.signature], clock=reactor, alternates=moved.values(),
                users={"ci": "s3cret"}, private={"ci/private": "ci"}, private_image=self.private, **hub_options
            )
            resource = self.hub.app.resource()
            # ``wrap`` may put a resource between regcache and the fake Hub, to reshape its answers.
            self.treq = StubTreq(wrap(resource) if wrap else resource)
            return Upstream(self.hub.registry_url, self.treq, reactor, metrics, credentials, self._timeouts,
                            jitter=lambda: 0.5, docker_hub=True, realms=[self.hub.hosts["auth"]])

        super().__init__(upstream=make, tag_ttl=tag_ttl, max_stale=max_stale, root=root,
                         revalidate_deadline=revalidate_deadline, auth=auth, bucket=bucket)

    def get(self, path, method="GET", headers=None, peer="192.168.1.1") -> "Client":
        c = self.client(path, method, headers, peer)
        self.settle()
        return c

    def stats(self):
        return self.hub.stats()


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
