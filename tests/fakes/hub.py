# -*- test-case-name: tests.test_fake_hub -*-
"""
A fake Docker Hub: registry, token realm and blob CDN in one Klein app.

The mirror's hardest behaviour is what it does with Hub's quirks, so this fake
copies them rather than the OCI spec's ideal: a bearer-token dance with
``insufficient_scope`` 401s for missing and private repos, manifest Accept
negotiation (a manifest list becomes its linux/amd64 child, an unaccepted OCI
index is a 404), rate-limit headers where only manifest GETs count, and blob
GETs answered with a 307 to a CDN host that rejects ``Authorization``.  On top
it counts every request a test may want to assert on, and injects faults.

**Hosts.**  One app plays four hosts and dispatches on the ``Host`` header,
because under ``treq.testing.StubTreq`` every hostname reaches the same
resource: ``registry`` (like registry-1.docker.io), ``auth`` (like
auth.docker.io, the token realm), ``cdn`` (like production.cloudflare.docker.com)
and ``control`` (the ``/_fake/`` endpoints, on their own host so that a
registry that is "down" can still be brought back up).  A request whose Host
matches none is matched by its local port, then refused with 404.

In memory::

    hub = FakeHub(images.values(), clock=task.Clock())
    treq = StubTreq(hub.resource())
    treq.get(hub.registry_url + "/v2/")            # http://registry.fake/v2/

On loopback, ``LoopbackHub(hub, reactor).start()`` listens on four ephemeral
ports of 127.0.0.1 and points the host names at them; ``python -m
tests.fakes.serve`` does that in a subprocess (see ``tests/fakes/serve.py``).

**Tokens.**  ``GET /token?service=registry.docker.io&scope=repository:NAME:pull``
(``scope`` may repeat, or hold several space-separated scopes), anonymous or
with HTTP Basic; ``POST /token`` takes the OAuth2 password and refresh_token
grants that containerd tries first.  Anonymous tokens grant pull on public
repos; a user's token also grants that user's private repos.  Tokens expire
``token_ttl`` seconds after issue on the injected clock.

**Rate limits.**  Manifest GETs and HEADs carry ``ratelimit-limit``,
``ratelimit-remaining`` (``N;w=21600``) and ``docker-ratelimit-source``;
only GETs spend the quota, and at zero they get a 429.  ``ratelimitpreview/test:latest``
(the first image's content) is there for Docker Hub's free quota check: a
token for its pull scope, then a HEAD of its manifest.

**Details a mirror may trip on.**  Manifests by digest are served as stored
whatever the Accept (Accept only steers tag lookups).  ``If-None-Match`` with
the Etag gets a 304.  CDN URLs are signed and expire ``cdn_url_ttl`` seconds
(default 1200) after the redirect: later, the CDN answers 403.  The CDN sends
no ``Docker-Content-Digest``, like Hub's.  On loopback, a TLS ClientHello on
any port gets Go's "HTTP request to an HTTPS server" 400 at once, so clients
that try https first fall back to http without a 10 s handshake timeout.

**Referrers** (OCI 1.1).  ``GET /v2/<repo>/referrers/<digest>[?artifactType=T]``
answers an image index of the repo's manifests whose ``subject`` is that
digest (possibly none), filtered by ``artifactType`` with
``OCI-Filters-Applied: artifactType``.  ``referrers=False`` (or ``POST
/_fake/referrers {"enabled": false}``) makes it a registry without the API,
which answers 404, so clients fall back to ``sha256-<hex>`` tags.  A
referrers fault takes every kind a manifest GET does.

**Faults** (``FakeHub.fault`` or ``POST /_fake/fault``), each with a ``scope``
of ``manifests`` (registry manifest GET/HEAD), ``blobs`` (CDN GETs), ``token``
(the realm), ``tags`` (tag list GETs), ``referrers`` (referrers GETs) or ``all`` (manifests and blobs), an
optional ``path`` substring the
request path must contain, and ``times`` (how many requests it hits; default
until cleared).  The token realm takes every kind; a body kind there shapes
the token's JSON answer.  Kinds:

- ``status``: answer ``status`` (default 503; a 429 gets the TOOMANYREQUESTS
  pull-limit body, or with ``bare`` a plain "Too Many Requests" as the abuse
  limit sends, and ``retry_after`` as ``Retry-After`` if given).
- ``huge``: answer ``status`` (default 200) with ``size`` bytes of filler
  (default 300 MiB) instead of the real body, chunked (no Content-Length)
  and paced like ``drip``: the body a mirror must refuse to buffer.
- ``hang``: accept the request and never answer.
- ``reset``: send headers and ``after`` body bytes (default half), then abort
  the TCP connection (RST on a real socket).
- ``stall``: send headers and ``after`` body bytes, then nothing, forever.
- ``short``: ``Content-Length`` is the real size; send ``after`` bytes (default
  half), then close the connection cleanly.
- ``wrong``: send different bytes of the same length (every byte inverted).
- ``drip``: send ``chunk`` bytes (default 16 KiB) every ``interval`` seconds
  (default 0.05) on the injected clock.
- ``norange``: the CDN ignores ``Range`` and answers 200 with the whole blob.
- ``slow`` (``manifests`` only): answer as usual, ``delay`` seconds (default
  1) late on the injected clock: a check that outlasts a deadline.
- ``down`` / ``up`` (loopback only, take ``host``: registry, auth, cdn or all):
  stop listening and abort open connections, so connects are refused; listen
  again on the same port.

**Modes** (``FakeHub.mode`` or ``POST /_fake/mode {"mode": ...}``): whole
states of the Hub to switch between, each first undoing the last:
``normal``; ``hung`` (every registry, realm and CDN request accepted and
never answered); ``refusing`` (loopback only: every port but control
closed); ``429-pull-limit`` (no pulls left: manifest GETs answer Hub's
pull-limit 429 with the rate-limit headers, HEADs and blobs go on;
``retry_after`` optional); ``429-abuse`` (a bare 429 to every manifest and
blob request).

**Control endpoints** (control host; JSON in and out):

- ``GET /_fake/stats``: the counters (``FakeHub.stats()``).
- ``GET /_fake/log``: the last requests, ``[{"host","method","path","status","agent"}]``
  (``agent``: the User-Agent sent, or "").
- ``POST /_fake/fault``: ``{"kind": ..., "scope": ..., ...}`` as above;
  ``{"kind": "clear"}`` removes every fault.
- ``POST /_fake/reset``: counters, faults, tags and rate limit back to the start.
- ``POST /_fake/mode``: ``{"mode": ..., "limit": L, "retry_after": S}`` as above.
- ``POST /_fake/tag``: ``{"repo", "tag", "image": "library/small:1#2"}`` moves a
  tag to a catalog image (``image.name``, or ``name#version`` for other
  versions), ``{"repo", "tag", "digest"}`` to a manifest already in the repo,
  ``{"repo", "tag", "delete": true}`` removes it.
- ``POST /_fake/ratelimit``: ``{"limit": L, "remaining": R, "retry_after": S}``;
  ``"limit": null`` stops sending rate-limit headers (unlimited).
- ``POST /_fake/expire-tokens``: every issued token becomes expired.
- ``POST /_fake/referrers``: ``{"enabled": false}`` turns the referrers API off.

**Stats** (``FakeHub.stats()``; per-key dicts are keyed by repo or digest)::

    {"pings": n, "token_requests": n, "tokens_issued": n, "unauthorized": n,
     "token_scopes": {"repository:library/small:pull": n},
     "manifest_gets": {repo: n}, "manifest_gets_total": n,
     "manifest_gets_by_ref": {"repo:tag" or "repo@digest": n},
     "manifest_heads": {repo: n}, "manifest_heads_total": n,
     "manifest_heads_by_ref": {...}, "rate_limited": n,
     "referrers_gets": {"repo@digest": n},
     "registry_blob_gets": {digest: n}, "registry_blob_gets_total": n,
     "registry_blob_heads": {digest: n},
     "cdn_blob_gets": {digest: n}, "cdn_blob_gets_total": n,
     "cdn_range_gets": {digest: n}, "cdn_rate_limited": {digest: n}, "cdn_bytes_sent": n,
     "cdn_authorization": n,
     "ratelimit": {"limit": L, "remaining": R}, "faults": [...]}

``cdn_blob_gets`` counts every GET of a blob at the CDN, including Range
requests and rejected ones: "upstream saw exactly one GET per blob" is
``cdn_blob_gets[digest] == 1``.  ``cdn_rate_limited`` counts those of them
a 429 fault answered; ``rate_limited`` only the pull limit's manifest 429s.
"""

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import struct
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Tuple
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.server import Site

from tests.fakes.images import DOCKER_LIST, OCI_INDEX, OCI_MANIFEST, Blob, Image

SERVICE = "registry.docker.io"
CDN_PREFIX = "/registry-v2/docker/registry/v2/blobs/sha256/"
SCOPES = ("manifests", "blobs", "token", "tags", "referrers", "all")
MODES = ("normal", "hung", "refusing", "429-pull-limit", "429-abuse")
KINDS = ("status", "hang", "reset", "stall", "short", "wrong", "drip", "norange", "huge")
#: Faults that only delay the real answer; never taken for a body fault.
DELAYS = ("slow",)
#: The kinds that answer in place of the real response, rather than shaping its body.
INSTEAD = ("status", "hang", "huge")
CHUNK = 64 * 1024
RATE_WINDOW = 21600
PROBE_REPO = "ratelimitpreview/test"
RATE_LIMITED_MESSAGE = (
    "You have reached your unauthenticated pull rate limit. "
    "You may increase the limit by authenticating and upgrading."
)
_INVERT = bytes(255 - i for i in range(256))


@dataclass
class Fault:
    kind: str
    scope: str = "all"
    #: None: the kind's own default (503 for ``status``, 200 for ``huge``).
    status: Optional[int] = None
    times: Optional[int] = None
    after: Optional[int] = None
    retry_after: Optional[int] = None
    path: Optional[str] = None
    chunk: int = 16 * 1024
    interval: float = 0.05
    size: int = 300 * 1024 * 1024
    #: A 429 without the pull-limit body: the abuse limit.
    bare: bool = False
    delay: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS + DELAYS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown fault scope {self.scope!r}")

    def covers(self, scope: str, path: str) -> bool:
        if self.scope != scope and not (self.scope == "all" and scope in ("manifests", "blobs")):
            return False
        return self.path is None or self.path in path


@dataclass
class _Token:
    user: Optional[str]
    repos: Set[str]
    expires: float


@dataclass
class _Repo:
    tags: Dict[str, str] = field(default_factory=dict)
    manifests: Dict[str, Image] = field(default_factory=dict)
    blobs: Dict[str, Blob] = field(default_factory=dict)


class _Stats:
    def __init__(self) -> None:
        self.counters: Counter = Counter()
        self.by: Dict[str, Counter] = {}

    def bump(self, name: str, key: Optional[str] = None, n: int = 1) -> None:
        if key is None:
            self.counters[name] += n
        else:
            self.by.setdefault(name, Counter())[key] += n
            self.counters[name + "_total"] += n

    def as_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for name in ("pings", "token_requests", "tokens_issued", "unauthorized", "rate_limited",
                     "cdn_bytes_sent", "cdn_authorization"):
            out[name] = self.counters[name]
        for name in ("manifest_gets", "manifest_gets_by_ref", "manifest_heads", "manifest_heads_by_ref",
                     "registry_blob_gets", "registry_blob_heads", "cdn_blob_gets", "cdn_range_gets",
                     "cdn_rate_limited", "token_scopes", "referrers_gets"):
            out[name] = dict(self.by.get(name, {}))
        for name in ("manifest_gets", "manifest_heads", "registry_blob_gets", "cdn_blob_gets"):
            out[name + "_total"] = self.counters[name + "_total"]
        return out


def accepted_types(request) -> Set[str]:
    """Every media type of every Accept line, as distribution merges them."""
    types = set()
    for line in request.requestHeaders.getRawHeaders(b"accept", []):
        for part in line.split(b","):
            media_type = part.split(b";", 1)[0].strip().lower().decode("latin-1")
            if media_type:
                types.add(media_type)
    return types


def _json(request, status: int, obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


def _error(request, status: int, code: str, message: str, detail: Any = None) -> bytes:
    error: Dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return _json(request, status, {"errors": [error]})


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _Sender:
    """
    Streams ``length`` bytes of an open file to a request as a push producer
    (the transport pauses it when its buffer fills), shaped by a fault.
    ``done`` fires when the response may be finished; it never fires when the
    fault cuts or stalls the connection (Klein cancels it when the client
    goes away).  A push producer, because Twisted runs pull producers through
    the global cooperator, which never turns under StubTreq.
    """

    def __init__(self, request, f, length: int, fault: Optional[Fault], clock: IReactorTime, on_bytes):
        self.request = request
        self.f = f
        self.fault = fault
        self.clock = clock
        self.on_bytes = on_bytes
        self.kind = fault.kind if fault else None
        self.limit = length
        if self.kind in ("reset", "stall", "short"):
            self.limit = min(length, fault.after if fault.after is not None else length // 2)
        self.paced = self.kind in ("drip", "huge")
        self.chunk = fault.chunk if self.paced else CHUNK
        self.sent = 0
        self.paused = False
        self.finished = False
        self.timer = None
        self.done: Deferred = Deferred(lambda d: self.stopProducing())

    def start(self) -> Deferred:
        self.request.registerProducer(self, True)
        self.resumeProducing()
        return self.done

    def resumeProducing(self) -> None:
        self.paused = False
        if self.paced:
            if self.timer is None and not self.finished:
                self._drip()
            return
        while not self.paused and not self.finished:
            self._send_one()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.finished = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.f.close()

    def _drip(self) -> None:
        self.timer = None
        if not self.finished and not self.paused:
            self._send_one()
            if not self.finished:
                self.timer = self.clock.callLater(self.fault.interval, self._drip)

    def _send_one(self) -> None:
        want = min(self.chunk, self.limit - self.sent)
        data = self.f.read(want) if want > 0 else b""
        if data:
            if self.kind == "wrong":
                data = data.translate(_INVERT)
            self.sent += len(data)
            self.on_bytes(len(data))
            self.request.write(data)
        if self.sent >= self.limit or not data:
            self._end()

    def _end(self) -> None:
        self.finished = True
        self.f.close()
        self.request.unregisterProducer()
        transport = self.request.channel.transport if self.request.channel else None
        if transport is None:
            return
        if self.kind == "reset":
            self._abort(transport)
        elif self.kind == "short":
            transport.loseConnection()
        elif self.kind == "stall":
            pass
        else:
            self.done.callback(None)

    def _abort(self, transport) -> None:
        """On a real socket, let the partial body out, then send an RST."""
        try:
            sock = transport.getHandle()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (AttributeError, OSError):
            transport.abortConnection()
            return
        self.clock.callLater(0.05, transport.abortConnection)


class _BytesFile:
    """A manifest body as a minimal file for _Sender."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def read(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def close(self) -> None:
        pass


class _Filler:
    """``size`` bytes of JSON-ish filler as a minimal file for _Sender, made as read."""

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int) -> bytes:
        n = min(n, self.left)
        self.left -= n
        return b" " * n

    def close(self) -> None:
        pass


class FakeHub:
    """
    The fake Hub.  ``images`` are published under their own repo and tag;
    ``alternates`` (e.g. ``images.moved_images``) are known but unpublished,
    ready for ``move_tag``.  ``users`` maps user names to passwords;
    ``private`` maps private repos to their owner (the repo gets the content
    of ``private_image`` if it has none).
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        images: Iterable[Image] = (),
        *,
        clock: IReactorTime,
        registry_host: str = "registry.fake",
        auth_host: str = "auth.fake",
        cdn_host: str = "cdn.fake",
        control_host: str = "control.fake",
        users: Optional[Mapping[str, str]] = None,
        private: Optional[Mapping[str, str]] = None,
        private_image: Optional[Image] = None,
        alternates: Iterable[Image] = (),
        token_ttl: int = 300,
        rate_limit: Optional[int] = 100000,
        cdn_url_ttl: int = 1200,
        referrers: bool = True,
    ):
        self.clock = clock
        self.hosts = {"registry": registry_host, "auth": auth_host, "cdn": cdn_host, "control": control_host}
        self.users = dict(users or {})
        self.private = dict(private or {})
        self.token_ttl = token_ttl
        self.cdn_url_ttl = cdn_url_ttl
        self.initial_rate_limit = rate_limit
        self.initial_referrers = referrers
        self.server: Optional["LoopbackHub"] = None
        #: The roles served over TLS (LoopbackHub's ``tls``): their URLs say https.
        self.tls_roles: Tuple[str, ...] = ()
        self._secret = secrets.token_bytes(16)
        self.tokens: Dict[str, _Token] = {}
        self.refresh_tokens: Dict[str, str] = {}
        self.catalog: Dict[str, Image] = {}
        self._published = list(images)
        self._private_image = private_image or (self._published[0] if self._published else None)
        for image in list(self._published) + list(alternates):
            self.catalog[self.catalog_key(image)] = image
        self.reset()

    # -- state -------------------------------------------------------------

    @staticmethod
    def catalog_key(image: Image) -> str:
        return image.name if image.version == 1 else f"{image.name}#{image.version}"

    def reset(self) -> None:
        """Counters, faults, tags and the rate limit back to how they started."""
        self._stats = _Stats()
        self.faults: List[Fault] = []
        self.requests: deque = deque(maxlen=1000)
        self.repos: Dict[str, _Repo] = {}
        for image in self._published:
            self.add_image(image)
        for repo in self.private:
            if repo not in self.repos and self._private_image is not None:
                self.add_image(self._private_image, repo=repo)
        if self._published:
            # Docker Hub's free quota check: HEAD it, read the headers.
            self.add_image(self._published[0], repo=PROBE_REPO, tag="latest")
        self.set_ratelimit(self.initial_rate_limit)
        self.referrers_api = self.initial_referrers

    def add_image(self, image: Image, repo: Optional[str] = None, tag: Optional[str] = None) -> None:
        """Publish ``image`` (its manifests and blobs) and point the tag at it."""
        r = self.repos.setdefault(repo or image.repo, _Repo())
        for m in image.manifests():
            r.manifests[m.digest] = m
        for b in image.blobs():
            r.blobs[b.digest] = b
        r.tags[tag or image.tag] = image.digest

    def move_tag(self, repo: str, tag: str, image: Optional[Image] = None, digest: Optional[str] = None) -> None:
        """Point ``repo:tag`` at another image, or at a manifest already in the repo."""
        if image is not None:
            self.add_image(image, repo=repo, tag=tag)
        elif digest is not None:
            if digest not in self.repos[repo].manifests:
                raise KeyError(f"{repo} has no manifest {digest}")
            self.repos[repo].tags[tag] = digest
        else:
            raise ValueError("move_tag needs an image or a digest")

    def delete_tag(self, repo: str, tag: str) -> None:
        self.repos[repo].tags.pop(tag, None)

    def set_ratelimit(self, limit: Optional[int], remaining: Optional[int] = None,
                      retry_after: Optional[int] = None) -> None:
        """``limit=None`` sends no rate-limit headers and never answers 429."""
        self.rate_limit = limit
        self.rate_remaining = limit if remaining is None else remaining
        self.rate_retry_after = retry_after

    def fault(self, kind: str, scope: str = "all", **params: Any) -> Fault:
        f = Fault(kind, scope, **params)
        self.faults.append(f)
        self.log.info("fault set: {fault}", fault=asdict(f))
        return f

    def clear_faults(self) -> None:
        self.faults.clear()

    def mode(self, mode: str, limit: int = 200, retry_after: Optional[int] = None) -> Deferred:
        """Switch to one of MODES (see the module docstring), from whatever the last was."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.clear_faults()
        self.set_ratelimit(self.initial_rate_limit)
        back = self.server.up("all") if self.server is not None else succeed(None)
        if mode == "hung":
            for scope in ("all", "token", "tags", "referrers"):
                self.fault("hang", scope)
        elif mode == "refusing":
            if self.server is None:
                raise ValueError("refusing needs a loopback server")
            return back.addCallback(lambda _: self.server.down("all"))
        elif mode == "429-pull-limit":
            self.set_ratelimit(limit, 0, retry_after)
        elif mode == "429-abuse":
            for scope in ("all", "token", "tags", "referrers"):
                self.fault("status", scope, status=429, bare=True, retry_after=retry_after)
        self.log.info("mode: {mode}", mode=mode)
        return back

    def expire_tokens(self) -> None:
        now = self.clock.seconds()
        for t in self.tokens.values():
            t.expires = min(t.expires, now)

    def stats(self) -> Dict[str, Any]:
        out = self._stats.as_dict()
        out["ratelimit"] = {"limit": self.rate_limit, "remaining": self.rate_remaining}
        out["faults"] = [asdict(f) for f in self.faults]
        return out

    def _take_fault(self, scope: str, path: str, kinds: Tuple[str, ...] = KINDS) -> Optional[Fault]:
        for f in self.faults:
            if f.kind in kinds and f.covers(scope, path):
                if f.times is not None:
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                return f
        return None

    def resource(self):
        """The Klein resource: for StubTreq, RequestTraversalAgent or a Site."""
        return self.app.resource()

    # -- URLs --------------------------------------------------------------

    def url(self, role: str) -> str:
        return f"{'https' if role in self.tls_roles else 'http'}://{self.hosts[role]}"

    @property
    def registry_url(self) -> str:
        return self.url("registry")

    @property
    def auth_url(self) -> str:
        return self.url("auth")

    @property
    def cdn_url(self) -> str:
        return self.url("cdn")

    @property
    def control_url(self) -> str:
        return self.url("control")

    def _role(self, request) -> Optional[str]:
        host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
        for role, name in self.hosts.items():
            if host == name.lower():
                return role
        port = str(request.getHost().port)
        for role, name in self.hosts.items():
            if ":" in name and name.rsplit(":", 1)[1] == port:
                return role
        return None

    def _record(self, request, role: Optional[str]) -> None:
        agent = (request.getHeader(b"user-agent") or b"").decode("latin-1")
        entry = {"host": role, "method": request.method.decode(), "path": request.uri.decode("latin-1"),
                 "status": None, "agent": agent}
        self.requests.append(entry)
        request.notifyFinish().addBoth(lambda _: entry.update(status=request.code))

    # -- registry ----------------------------------------------------------

    def _challenge(self, repo: Optional[str], error: Optional[str] = None) -> bytes:
        value = f'Bearer realm="{self.auth_url}/token",service="{SERVICE}"'
        if repo is not None:
            value += f',scope="repository:{repo}:pull"'
        if error is not None:
            value += f',error="{error}"'
        return value.encode()

    def _unauthorized(self, request, repo: Optional[str], error: Optional[str]) -> bytes:
        self._stats.bump("unauthorized")
        request.setHeader(b"www-authenticate", self._challenge(repo, error))
        detail = [{"Type": "repository", "Class": "", "Name": repo, "Action": "pull"}] if repo else None
        return _error(request, 401, "UNAUTHORIZED", "authentication required", detail)

    def _check_token(self, request, repo: Optional[str]) -> Optional[bytes]:
        """None if the request may go on, else the 401 body to answer."""
        auth = request.getHeader(b"authorization") or b""
        if not auth.lower().startswith(b"bearer "):
            return self._unauthorized(request, repo, None)
        token = self.tokens.get(auth[7:].strip().decode("latin-1"))
        if token is None or self.clock.seconds() >= token.expires:
            return self._unauthorized(request, repo, "invalid_token")
        if repo is not None and (repo not in self.repos or repo not in token.repos):
            return self._unauthorized(request, repo, "insufficient_scope")
        return None

    @app.route("/v2/", methods=["GET"])
    def ping(self, request):
        role = self._role(request)
        self._record(request, role)
        if role != "registry":
            return _error(request, 404, "NOT_FOUND", "not found")
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        self._stats.bump("pings")
        denied = self._check_token(request, None)
        if denied is not None:
            return denied
        return _json(request, 200, {})

    @app.route("/v2/<path:rest>", methods=["GET"])
    def registry(self, request, rest: str):
        role = self._role(request)
        self._record(request, role)
        if role != "registry":
            return _error(request, 404, "NOT_FOUND", "not found")
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        m = re.fullmatch(r"(?P<repo>.+)/(?:(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)|tags/list)", rest)
        if m is None:
            return _error(request, 404, "NAME_UNKNOWN", "repository name not known to registry")
        repo = m.group("repo")
        denied = self._check_token(request, repo)
        if denied is not None:
            return denied
        if m.group("kind") == "manifests":
            slow = self._take_fault("manifests", request.path.decode("latin-1"), DELAYS)
            if slow is not None:
                return deferLater(self.clock, slow.delay, self._manifest, request, repo, m.group("ref"))
            return self._manifest(request, repo, m.group("ref"))
        if m.group("kind") == "blobs":
            return self._blob(request, repo, m.group("ref"))
        if m.group("kind") == "referrers":
            return self._referrers(request, repo, m.group("ref"))
        return self._tags(request, repo)

    def _ratelimit_headers(self, request) -> None:
        if self.rate_limit is not None:
            request.setHeader(b"ratelimit-limit", f"{self.rate_limit};w={RATE_WINDOW}".encode())
            request.setHeader(b"ratelimit-remaining", f"{self.rate_remaining};w={RATE_WINDOW}".encode())
            request.setHeader(b"docker-ratelimit-source", b"127.0.0.1")

    def _status_fault(self, request, fault: Fault) -> bytes:
        status = fault.status or 503
        if status == 429:
            if fault.retry_after is not None:
                request.setHeader(b"retry-after", str(fault.retry_after).encode())
            if not fault.bare:
                return _error(request, 429, "TOOMANYREQUESTS", RATE_LIMITED_MESSAGE)
        body = f"<html><body><h1>{status} fake fault</h1></body></html>\n".encode()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html")
        request.setHeader(b"content-length", str(len(body)).encode())
        return body

    def _instead(self, request, fault: Fault):
        """The answer to a request that a fault of a kind in INSTEAD takes over."""
        if fault.kind == "status":
            return self._status_fault(request, fault)
        if fault.kind == "hang":
            return Deferred()
        # huge: filler, chunked, however the client copes.
        request.setResponseCode(fault.status or 200)
        request.setHeader(b"content-type", b"application/json")
        return _Sender(request, _Filler(fault.size), fault.size, fault, self.clock, lambda n: None).start()

    def _manifest(self, request, repo: str, ref: str):
        get = request.method == b"GET"
        by_digest = ":" in ref
        ref_key = f"{repo}@{ref}" if by_digest else f"{repo}:{ref}"
        if get:
            self._stats.bump("manifest_gets", repo)
            self._stats.bump("manifest_gets_by_ref", ref_key)
        else:
            self._stats.bump("manifest_heads", repo)
            self._stats.bump("manifest_heads_by_ref", ref_key)
        # A HEAD has no body to spoil, so it must not use up a body fault.
        kinds = KINDS if get else ("status", "hang")
        fault = self._take_fault("manifests", request.path.decode("latin-1"), kinds)
        if fault is not None and fault.kind in INSTEAD:
            return self._instead(request, fault)
        self._ratelimit_headers(request)
        if get and self.rate_limit is not None and self.rate_remaining <= 0:
            self._stats.bump("rate_limited")
            if self.rate_retry_after is not None:
                request.setHeader(b"retry-after", str(self.rate_retry_after).encode())
            return _error(request, 429, "TOOMANYREQUESTS", RATE_LIMITED_MESSAGE)

        r = self.repos[repo]
        digest = ref if by_digest else r.tags.get(ref)
        image = r.manifests.get(digest) if digest else None
        if image is None:
            return _error(request, 404, "MANIFEST_UNKNOWN", "manifest unknown", {"Tag" if not by_digest else "Digest": ref})
        if not by_digest:
            accepted = accepted_types(request)
            if image.media_type == OCI_INDEX and OCI_INDEX not in accepted:
                return _error(request, 404, "MANIFEST_UNKNOWN",
                              "OCI index found, but accept header does not support OCI indexes")
            if image.media_type == OCI_MANIFEST and OCI_MANIFEST not in accepted:
                return _error(request, 404, "MANIFEST_UNKNOWN",
                              "OCI manifest found, but accept header does not support OCI manifests")
            if image.media_type == DOCKER_LIST and DOCKER_LIST not in accepted:
                try:
                    image = image.child("amd64")
                except KeyError:
                    return _error(request, 404, "MANIFEST_UNKNOWN", "manifest unknown")
        if get and self.rate_limit is not None:
            self.rate_remaining -= 1
            self._ratelimit_headers(request)

        etag = f'"{image.digest}"'.encode()
        request.setHeader(b"content-type", image.media_type.encode())
        request.setHeader(b"docker-content-digest", image.digest.encode())
        request.setHeader(b"etag", etag)
        request.setHeader(b"content-length", str(image.size).encode())
        if etag in (request.getHeader(b"if-none-match") or b"").split(b", "):
            request.setResponseCode(304)
            request.responseHeaders.removeHeader(b"content-length")
            return b""
        if not get:
            return b""
        if fault is not None and fault.kind == "norange":
            fault = None
        return _Sender(request, _BytesFile(image.manifest), image.size, fault, self.clock, lambda n: None).start()

    def _blob(self, request, repo: str, digest: str):
        blob = self.repos[repo].blobs.get(digest)
        if request.method == b"HEAD":
            self._stats.bump("registry_blob_heads", digest)
        else:
            self._stats.bump("registry_blob_gets", digest)
        if blob is None:
            return _error(request, 404, "BLOB_UNKNOWN", "blob unknown to registry", digest)
        if request.method == b"HEAD":
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", str(blob.size).encode())
            request.setHeader(b"docker-content-digest", blob.digest.encode())
            request.setHeader(b"accept-ranges", b"bytes")
            return b""
        location = self.cdn_location(blob)
        body = f'<a href="{location}">Temporary Redirect</a>.\n\n'.encode()
        request.setResponseCode(307)
        request.setHeader(b"location", location.encode())
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-length", str(len(body)).encode())
        return body

    def _signature(self, hex_digest: str, expires: int) -> str:
        return hmac.new(self._secret, f"{hex_digest}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def cdn_location(self, blob: Blob) -> str:
        """A signed CDN URL for ``blob`` that expires after ``cdn_url_ttl`` seconds."""
        expires = int(self.clock.seconds()) + self.cdn_url_ttl
        return (f"{self.cdn_url}{CDN_PREFIX}{blob.hex[:2]}/{blob.hex}/data"
                f"?verify={expires}-{self._signature(blob.hex, expires)}")

    def _referrers(self, request, repo: str, digest: str):
        self._stats.bump("referrers_gets", f"{repo}@{digest}")
        if not self.referrers_api:
            return _error(request, 404, "NOT_FOUND", "page not found")
        fault = self._take_fault("referrers", request.path.decode("latin-1"))
        if fault is not None and fault.kind in INSTEAD:
            return self._instead(request, fault)
        wanted = request.args.get(b"artifactType", [b""])[0].decode("latin-1")
        found = [m for m in self.repos[repo].manifests.values()
                 if m.subject == digest and (not wanted or m.artifact_type == wanted)]
        if wanted:
            request.setHeader(b"oci-filters-applied", b"artifactType")
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": m.media_type, "digest": m.digest, "size": m.size, "artifactType": m.artifact_type}
            for m in sorted(found, key=lambda m: m.digest)
        ]}
        body = json.dumps(index).encode()
        request.setHeader(b"content-type", OCI_INDEX.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        if fault is not None and fault.kind == "norange":
            fault = None
        return _Sender(request, _BytesFile(body), len(body), fault, self.clock, lambda n: None).start()

    def _tags(self, request, repo: str):
        fault = self._take_fault("tags", request.path.decode("latin-1"), INSTEAD)
        if fault is not None:
            return self._instead(request, fault)
        tags = sorted(self.repos[repo].tags)
        last = request.args.get(b"last", [b""])[0].decode()
        if last:
            tags = [t for t in tags if t > last]
        n = request.args.get(b"n")
        if n:
            more = len(tags) > int(n[0])
            tags = tags[:int(n[0])]
            if more and tags:
                # As distribution does: RFC 5988 Link to the next page.
                request.setHeader("Link", f'</v2/{repo}/tags/list?n={int(n[0])}&last={tags[-1]}>; rel="next"')
        return _json(request, 200, {"name": repo, "tags": tags})

    # -- token realm -------------------------------------------------------

    def _can_pull(self, repo: str, user: Optional[str]) -> bool:
        if repo not in self.repos:
            return False
        owner = self.private.get(repo)
        return owner is None or owner == user

    def _grant(self, user: Optional[str], scopes: Iterable[str]) -> Tuple[str, List[str]]:
        repos = set()
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) == 3 and parts[0] == "repository" and "pull" in parts[2].split(","):
                if self._can_pull(parts[1], user):
                    repos.add(parts[1])
        token = "fake-" + secrets.token_hex(16)
        self.tokens[token] = _Token(user, repos, self.clock.seconds() + self.token_ttl)
        self._stats.bump("tokens_issued")
        return token, sorted(repos)

    def _token_answer(self, request, token: str, extra: Optional[dict] = None) -> bytes:
        answer = {"token": token, "access_token": token, "expires_in": self.token_ttl,
                  "issued_at": _iso(self.clock.seconds())}
        answer.update(extra or {})
        return _json(request, 200, answer)

    @staticmethod
    def _scopes(values: Iterable[bytes]) -> List[str]:
        return [s for v in values for s in v.decode().split()]

    @app.route("/token", methods=["GET", "POST"])
    def token(self, request):
        role = self._role(request)
        self._record(request, role)
        if role != "auth":
            return _error(request, 404, "NOT_FOUND", "not found")
        self._stats.bump("token_requests")
        fault = self._take_fault("token", request.path.decode("latin-1"))
        if fault is not None and fault.kind in INSTEAD:
            return self._instead(request, fault)
        answer = self._oauth(request) if request.method == b"POST" else self._token_get(request)
        if fault is None or fault.kind == "norange" or request.code != 200:
            return answer
        return _Sender(request, _BytesFile(answer), len(answer), fault, self.clock, lambda n: None).start()

    def _token_get(self, request) -> bytes:
        """The anonymous or Basic-authenticated GET Docker Hub's realm answers."""
        user = None
        auth = request.getHeader(b"authorization") or b""
        if auth.lower().startswith(b"basic "):
            try:
                name, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                name, password = "", None
            if self.users.get(name) != password or not name:
                return _json(request, 401, {"details": "incorrect username or password"})
            user = name
        scopes = self._scopes(request.args.get(b"scope", []))
        for scope in scopes:
            self._stats.bump("token_scopes", scope)
        token, _ = self._grant(user, scopes)
        return self._token_answer(request, token)

    def _oauth(self, request) -> bytes:
        """The OAuth2 form containerd tries before GET when it has credentials."""
        form = parse_qs(request.content.read().decode())
        one = lambda k: form.get(k, [""])[0]
        grant = one("grant_type")
        if grant == "password":
            user = one("username")
            if not user or self.users.get(user) != one("password"):
                return _json(request, 401, {"details": "incorrect username or password"})
        elif grant == "refresh_token":
            user = self.refresh_tokens.get(one("refresh_token"))
            if user is None:
                return _json(request, 401, {"details": "invalid refresh token"})
        else:
            return _json(request, 400, {"error": "unsupported_grant_type"})
        scopes = [s for v in form.get("scope", []) for s in v.split()]
        for scope in scopes:
            self._stats.bump("token_scopes", scope)
        token, _ = self._grant(user, scopes)
        extra = {"scope": " ".join(scopes)}
        if one("access_type") == "offline":
            refresh = "refresh-" + secrets.token_hex(16)
            self.refresh_tokens[refresh] = user
            extra["refresh_token"] = refresh
        return self._token_answer(request, token, extra)

    # -- CDN ---------------------------------------------------------------

    @app.route("/registry-v2/<path:rest>", methods=["GET"])
    def cdn(self, request, rest: str):
        role = self._role(request)
        self._record(request, role)
        if role != "cdn":
            return _error(request, 404, "NOT_FOUND", "not found")
        m = re.fullmatch(r"docker/registry/v2/blobs/sha256/[0-9a-f]{2}/(?P<hex>[0-9a-f]{64})/data", rest)
        if m is None:
            return self._cdn_error(request, 404, "NoSuchKey")
        digest = "sha256:" + m.group("hex")
        get = request.method == b"GET"
        if get:
            self._stats.bump("cdn_blob_gets", digest)
        if request.getHeader(b"authorization") is not None:
            self._stats.bump("cdn_authorization")
            return self._cdn_error(request, 400, "InvalidArgument", "Only one auth mechanism allowed")
        verify = request.args.get(b"verify", [b""])[0].decode()
        expires, _, signature = verify.partition("-")
        if (not expires.isdigit() or not hmac.compare_digest(signature, self._signature(m.group("hex"), int(expires)))
                or int(expires) < self.clock.seconds()):
            return self._cdn_error(request, 403, "AccessDenied", "Request has expired or bad signature")
        blob = self._find_blob(digest)
        if blob is None:
            return self._cdn_error(request, 404, "NoSuchKey")

        fault = self._take_fault("blobs", request.path.decode("latin-1")) if get else None
        if fault is not None and fault.kind == "status" and fault.status == 429:
            self._stats.bump("cdn_rate_limited", digest)
        if fault is not None and fault.kind in INSTEAD:
            return self._instead(request, fault)
        size = blob.size
        start, end = 0, size - 1
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"etag", f'"{blob.hex[:32]}"'.encode())
        range_header = request.getHeader(b"range")
        if range_header is not None and get:
            self._stats.bump("cdn_range_gets", digest)
        if range_header is not None and not (fault is not None and fault.kind == "norange"):
            parsed = _parse_range(range_header.decode("latin-1"), size)
            if parsed == "unsatisfiable":
                request.setResponseCode(416)
                request.setHeader(b"content-range", f"bytes */{size}".encode())
                request.setHeader(b"content-length", b"0")
                return b""
            if parsed is not None:
                start, end = parsed
                request.setResponseCode(206)
                request.setHeader(b"content-range", f"bytes {start}-{end}/{size}".encode())
        length = end - start + 1
        request.setHeader(b"content-length", str(length).encode())
        if not get:
            return b""
        f = open(blob.path, "rb")
        f.seek(start)
        if fault is not None and fault.kind == "norange":
            fault = None
        return _Sender(request, f, length, fault, self.clock,
                       lambda n: self._stats.bump("cdn_bytes_sent", n=n)).start()

    def _find_blob(self, digest: str) -> Optional[Blob]:
        for r in self.repos.values():
            if digest in r.blobs:
                return r.blobs[digest]
        for image in self.catalog.values():
            for b in image.blobs():
                if b.digest == digest:
                    return b
        return None

    @staticmethod
    def _cdn_error(request, status: int, code: str, message: str = "") -> bytes:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message></Error>").encode()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/xml")
        request.setHeader(b"content-length", str(len(body)).encode())
        return body

    # -- control -----------------------------------------------------------

    @app.route("/_fake/<path:what>", methods=["GET", "POST"])
    def control(self, request, what: str):
        if self._role(request) != "control":
            return _error(request, 404, "NOT_FOUND", "not found")
        if request.method == b"GET":
            if what == "stats":
                return _json(request, 200, self.stats())
            if what == "log":
                return _json(request, 200, list(self.requests))
            return _json(request, 404, {"error": f"no GET /_fake/{what}"})
        raw = request.content.read()
        body = json.loads(raw) if raw.strip() else {}
        try:
            result = self._control(what, body)
        except (KeyError, ValueError, TypeError) as e:
            return _json(request, 400, {"error": str(e)})
        if isinstance(result, Deferred):
            return result.addCallback(lambda _: _json(request, 200, {"ok": True}))
        return _json(request, 200, {"ok": True})

    def _control(self, what: str, body: dict) -> Optional[Deferred]:
        if what == "fault":
            kind = body.pop("kind")
            if kind == "clear":
                self.clear_faults()
            elif kind in ("down", "up"):
                if self.server is None:
                    raise ValueError("down/up need a loopback server")
                host = body.get("host", "all")
                return self.server.down(host) if kind == "down" else self.server.up(host)
            else:
                self.fault(kind, **body)
        elif what == "reset":
            self.reset()
        elif what == "mode":
            return self.mode(body.pop("mode"), **body)
        elif what == "tag":
            if body.get("delete"):
                self.delete_tag(body["repo"], body["tag"])
            elif "image" in body:
                self.move_tag(body["repo"], body["tag"], image=self.catalog[body["image"]])
            else:
                self.move_tag(body["repo"], body["tag"], digest=body["digest"])
        elif what == "ratelimit":
            self.set_ratelimit(body.get("limit"), body.get("remaining"), body.get("retry_after"))
        elif what == "expire-tokens":
            self.expire_tokens()
        elif what == "referrers":
            self.referrers_api = bool(body["enabled"])
        else:
            raise KeyError(f"no POST /_fake/{what}")
        return None


def _parse_range(value: str, size: int):
    """
    One byte range as (start, end), "unsatisfiable", or None to answer 200
    (a multi-range or a header that isn't bytes=).
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            n = int(last)
            if n <= 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1)


class _TrackingSite(Site):
    """
    A Site that remembers each open connection's transport, so "down" can cut
    them, and answers a TLS ClientHello at once, as Go's plain-HTTP server
    does: clients told to skip TLS verification (skopeo, containerd) try https
    first and fall back to http only on an answer; Twisted alone would wait
    for a line and make them time out (10 s) on every connection.
    """

    def __init__(self, resource):
        super().__init__(resource)
        self.transports: Set[Any] = set()

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        make, received, lost = protocol.makeConnection, protocol.dataReceived, protocol.connectionLost
        state = {"transport": None, "first": True}

        def makeConnection(transport):
            state["transport"] = transport
            self.transports.add(transport)
            return make(transport)

        def dataReceived(data):
            if state["first"]:
                state["first"] = False
                if data[:1] == b"\x16":
                    state["transport"].write(
                        b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
                    state["transport"].loseConnection()
                    return None
            return received(data)

        def connectionLost(reason):
            self.transports.discard(state["transport"])
            return lost(reason)

        protocol.makeConnection = makeConnection
        protocol.dataReceived = dataReceived
        protocol.connectionLost = connectionLost
        return protocol

    def log(self, request) -> None:
        """No access log: the fake's own request log is enough."""


class LoopbackHub:
    """
    Serves a FakeHub on four ephemeral ports of ``interface`` and points the
    hub's host names at them (``127.0.0.1:PORT``).  ``down``/``up`` stop and
    restart one host's listener on the same port.  Given ``tls`` (a server
    context factory), the registry, auth and CDN ports serve TLS; the
    control port stays plain, for the tests' own requests.
    """

    log = Logger()
    ROLES = ("registry", "auth", "cdn", "control")

    def __init__(self, hub: FakeHub, reactor: IReactorTCP, interface: str = "127.0.0.1", tls=None):
        self.hub = hub
        self.tls = tls
        if tls is not None:
            hub.tls_roles = ("registry", "auth", "cdn")
        self.reactor = reactor
        self.interface = interface
        self.site = _TrackingSite(hub.app.resource())
        self.ports: Dict[str, Any] = {}
        self.numbers: Dict[str, int] = {}
        hub.server = self

    def start(self, ports: Optional[Mapping[str, int]] = None) -> "LoopbackHub":
        for role in self.ROLES:
            port = self._listen(role, (ports or {}).get(role, 0))
            self.ports[role] = port
            self.numbers[role] = port.getHost().port
            self.hub.hosts[role] = f"{self.interface}:{self.numbers[role]}"
        return self

    def _listen(self, role: str, number: int):
        if role in self.hub.tls_roles:
            return self.reactor.listenSSL(number, self.site, self.tls, interface=self.interface)
        return self.reactor.listenTCP(number, self.site, interface=self.interface)

    def urls(self) -> Dict[str, str]:
        return {role: self.hub.url(role) for role in self.ROLES}

    def _roles(self, host: str) -> List[str]:
        if host == "all":
            return ["registry", "auth", "cdn"]
        if host not in self.ROLES:
            raise ValueError(f"unknown host {host!r}")
        return [host]

    def down(self, host: str = "all") -> Deferred:
        waits = []
        for role in self._roles(host):
            port = self.ports.pop(role, None)
            if port is None:
                continue
            waits.append(port.stopListening())
            for transport in list(self.site.transports):
                if transport.getHost().port == self.numbers[role]:
                    transport.abortConnection()
        self.log.info("fake hub {host} down", host=host)
        return DeferredList(waits)

    def up(self, host: str = "all") -> Deferred:
        for role in self._roles(host):
            if role not in self.ports:
                self.ports[role] = self._listen(role, self.numbers[role])
        self.log.info("fake hub {host} up", host=host)
        return succeed(None)

    def stop(self) -> Deferred:
        return DeferredList([p.stopListening() for p in self.ports.values()])
