"""
The client for one upstream registry.

An Upstream is one object among possibly many: it knows its URL, its
credentials and tokens, its rate-limit state and its timeouts, and nothing
about the cache.  It speaks the pull API the way Docker Hub really answers it:
bearer challenges, 401 insufficient_scope for a missing repo, 307s of blobs to
a CDN host that must not see our Authorization, and 429s with rate-limit
headers.

Bodies are never buffered whole except tokens, manifests, tag lists and
error pages, which are small and read under a cap and deadlines
(exchange.py); a blob comes back as a ResponseStream, its status and
Content-Range read here and its body unread for the caller to stream.
Every failure is raised as an UpstreamError whose message names this
upstream (or its token server or blob host) in words.  Upstream implements
regcache.remote.Remote.
"""

import random
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, List, Optional
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from regcache.accounting import ANONYMOUS
from regcache.auth import Challenge, Credentials, Realms, TokenCache, parse_challenge
from regcache.errors import UpstreamError, UpstreamHeld, UpstreamNotFound, UpstreamTimeout
from regcache.exchange import Limits, abandon
from regcache.headers import (USER_AGENT, content_length, decimal, header, http_url, media_type_of, ratelimit,
                              retry_after)
from regcache.health import Health
from regcache.manifests import MAX_MANIFEST, OCI_INDEX, Manifest, check_index, sniffed_type
from regcache.reference import Digest, InvalidReference
from regcache.remote import MAX_REFERRERS, BlobStream, ManifestInfo, MemberHealth, Referrers, TagList

DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io", "registry.hub.docker.com")

REDIRECTS = (301, 302, 303, 307, 308)

#: The repository Docker Hub answers its free quota check for.
PROBE_REPOSITORY = "ratelimitpreview/test"

#: Docker Hub's tag lists run to a few hundred KiB for the busiest images.
MAX_TAG_LIST = 16 * 1024 * 1024

#: The most of a 429's body read to tell the pull limit from the abuse
#: limit: Hub's is a one-line JSON error.
MAX_429_BODY = 8 * 1024

#: What Docker Hub's pull-limit 429 says ("You have reached your pull rate
#: limit", "...your unauthenticated pull rate limit"); a 429 without it is
#: the abuse limit.
PULL_LIMIT_WORDS = b"pull rate limit"


@dataclass(frozen=True)
class Timeouts:
    """
    The connect timeout lives in the Agent the HTTP client is built on
    (service.py); these bound what happens after a connection exists.
    """

    header: float = 5.0
    idle: float = 15.0
    #: A token, manifest, tag list or error page arrives whole within this,
    #: however it trickles: the idle timer alone never ends a body that
    #: sends a byte every few seconds.
    body: float = 30.0
    #: Attempts for an idempotent request that may be retried.
    attempts: int = 3
    #: No retry starts later than this after the first attempt.
    retry_budget: float = 10.0


class Upstream:
    """
    One upstream registry.  ``key`` names the upstream it serves (its tags
    and its metrics' ``upstream`` label; by default from its host), which
    several members of one chain share; ``realms`` are the token realm hosts
    allowed beside its own domain (auth.py).
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        http,
        clock,
        metrics,
        credentials: Optional[Credentials] = None,
        timeouts: Timeouts = Timeouts(),
        jitter=random.random,
        docker_hub: Optional[bool] = None,
        key: Optional[str] = None,
        realms: Iterable[str] = (),
    ):
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        self.host = parts.netloc
        #: Docker Hub keeps official images under library/; None means
        #: "decide from the host name".
        self.is_docker_hub = parts.hostname in DOCKER_HUB_HOSTS if docker_hub is None else docker_hub
        #: The name the cache files this upstream's tags under.
        self.key = key or ("docker.io" if parts.hostname in DOCKER_HUB_HOSTS else parts.netloc)
        self.http = http
        self.clock = clock
        self.metrics = metrics
        self.timeouts = timeouts
        self.credentials = credentials
        #: Who the client's error names when this upstream fails.
        self.who = f"upstream {self.host}"
        self.limits = Limits(clock, timeouts.header, timeouts.idle, timeouts.body)
        #: The account the pull accounting files this member's requests under.
        self.credential = credentials.username if credentials else ANONYMOUS
        self.tokens = TokenCache(_TokenRequests(http, self._count), clock, credentials, self.limits, self.who,
                                 Realms(parts.hostname or "", realms))
        self._challenge: Optional[Challenge] = None
        self._jitter = jitter
        self._health = Health(clock, self.who, self.key, self.host, metrics)

    def __repr__(self) -> str:
        return f"<Upstream {self.url}>"

    def replace_credentials(self, credentials: Optional[Credentials]) -> None:
        """
        A new password for the same account (a reloaded password file):
        token requests send it from now on, and no token the old one got is
        used again.  The account's name, and so its accounting, stays.
        """
        self.credentials = credentials
        self.tokens.replace_credentials(credentials)

    def repository(self, name: str) -> str:
        """
        The upstream's name for a repository: Docker Hub keeps official
        images under ``library/``.
        """
        if self.is_docker_hub and "/" not in name:
            return "library/" + name
        return name

    def health(self) -> List[MemberHealth]:
        return [self._health.state()]

    # The pull API

    async def head_manifest(self, name: str, reference: str, accept, retry: bool = False) -> Optional[ManifestInfo]:
        """
        Resolve a reference with a HEAD, which Docker Hub does not count as a
        pull.  Returns None when upstream answered 200 but named no digest
        (the caller may then GET); any failure raises, and is never turned
        into a counted GET here.
        """
        response, _ = await self._request(
            "HEAD", f"/v2/{name}/manifests/{reference}", "manifest", name, _accept(accept), retry
        )
        await self._drain(response)
        self._expect(response, (200,), "manifest")
        digest = header(response.headers, b"docker-content-digest")
        media_type = media_type_of(response.headers)
        if not digest or not media_type:
            return None
        return ManifestInfo(self._announced(digest), media_type, content_length(response.headers))

    async def get_manifest(
        self, name: str, reference: str, accept, expect: Optional[Digest] = None, retry: bool = False
    ) -> Manifest:
        """
        GET a manifest (a counted pull on Docker Hub) and check its bytes
        against the digest asked for, or the one upstream announced.
        """
        response, _ = await self._request(
            "GET", f"/v2/{name}/manifests/{reference}", "manifest", name, _accept(accept), retry
        )
        if response.code != 200:
            await self._drain(response)
            self._expect(response, (200,), "manifest")
        body = await self.limits.read(response, MAX_MANIFEST, self.who, "manifest")
        announced = header(response.headers, b"docker-content-digest")
        if expect is None and announced:
            expect = self._announced(announced)
        digest = Digest.of(body, expect.algorithm if expect else "sha256")
        if expect is not None and digest != expect:
            raise UpstreamError(f"the manifest {self.who} sent does not match {expect}", 502)
        media_type = media_type_of(response.headers) or sniffed_type(body)
        return Manifest(body, media_type, digest)

    async def open_blob(self, name: str, digest: Digest) -> BlobStream:
        """
        Start a blob download, following redirects to a CDN here rather than
        passing them to the client, and sending Authorization only to the
        origin that asked for it.  A failure anywhere on that path (registry
        or CDN) is retried.
        """
        return await self._blob_from(name, digest, 0)

    async def _blob_from(self, name: str, digest: Digest, offset: int) -> BlobStream:
        """The blob from ``offset`` (with Range when past 0), its stream resuming here."""
        response = await self._retrying(
            "GET", f"blob {digest}",
            lambda: self._exchange("GET", "blob", lambda: self._open_blob(name, digest, offset)),
        )
        return blob_stream(response, offset, self.host, self.timeouts.idle,
                           lambda at: self._blob_from(name, digest, at))

    async def head_blob(self, name: str, digest: Digest) -> int:
        """
        A blob's size, from a HEAD (redirects followed as for a GET), so a
        client's HEAD costs no download.
        """
        response = await self._retrying(
            "HEAD", f"blob {digest}",
            lambda: self._exchange("HEAD", "blob", lambda: self._open_blob(name, digest, 0, "HEAD")),
        )
        await self._drain(response)
        size = content_length(response.headers)
        if size is None:
            raise UpstreamError("upstream answered a blob HEAD without a Content-Length", 502)
        return size

    async def _open_blob(self, name: str, digest: Digest, offset: int, method: str = "GET"):
        extra = {b"Range": [b"bytes=%d-" % offset]} if offset else {}
        url = self.url + f"/v2/{name}/blobs/{digest}"
        response, authorization = await self._authenticated(method, url[len(self.url):], "blob", name, extra)
        hops = 0
        while response.code in REDIRECTS:
            location = header(response.headers, b"location")
            await self._drain(response)
            hops += 1
            if not location or hops > 5:
                raise UpstreamError(f"{self.who} redirected the blob without a usable Location", 502)
            target = http_url(url, location)
            if target is None:
                raise UpstreamError(f"{self.who} redirected the blob to an unusable URL: {location[:80]}", 502)
            if _origin(target.geturl()) != _origin(url):
                authorization = None
            url = target.geturl()
            headers = Headers(extra)
            if authorization:
                headers.setRawHeaders(b"Authorization", [authorization])
            response = await self._send(method, url, headers, "blob-redirect")
            if response.code == 429:
                # The registry's own blob host limiting is the registry's
                # abuse limit: unpaused, every client asking for an
                # uncached blob would cost one refused GET.
                await self._drain(response)
                raise _Limited(False, retry_after(response.headers))
            if response.code >= 500:
                await self._drain(response)
                raise UpstreamError(f"{self._who(url)} answered {response.code}", response.code)
        if response.code not in (200, 206):
            await self._drain(response)
            self._expect(response, (200, 206), "blob")
        return response

    async def tags_list(self, name: str, query: bytes) -> TagList:
        """
        Forward a tag list request.
        """
        path = f"/v2/{name}/tags/list" + ("?" + query.decode("ascii") if query else "")
        response, _ = await self._request("GET", path, "tags", name, {}, retry=True)
        if response.code == 404:
            await self._drain(response)
            raise UpstreamNotFound(name)
        body = await self.limits.read(response, MAX_TAG_LIST, self.who, "tag list")
        return TagList(response.code, response.headers.getRawHeaders(b"link"), body)

    async def referrers(
        self, name: str, digest: Digest, artifact_type: Optional[str] = None, retry: bool = False
    ) -> Referrers:
        """
        GET the referrers index of ``digest``; a 404 (a registry without the
        API) raises UpstreamNotFound, for the client to fall back to tags.
        The bytes are served as they come, so they must be an image index.
        """
        path = f"/v2/{name}/referrers/{digest}"
        if artifact_type is not None:
            path += "?" + urlencode({"artifactType": artifact_type})
        response, _ = await self._request(
            "GET", path, "referrers", name, {b"Accept": [OCI_INDEX.encode("ascii")]}, retry
        )
        if response.code != 200:
            await self._drain(response)
            self._expect(response, (200,), "referrers index")
        body = await self.limits.read(response, MAX_REFERRERS, self.who, "referrers index")
        try:
            check_index(body)
        except ValueError as e:
            raise UpstreamError(f"{self.who} sent a bad referrers index: {e}", 502) from None
        applied = (header(response.headers, b"oci-filters-applied") or "").split(",")
        return Referrers(body, artifact_type is not None and "artifactType" in (f.strip() for f in applied))

    async def probe_ratelimit(self) -> None:
        """
        Docker Hub's free quota check (PROTOCOL.md §10): a HEAD of
        ratelimitpreview/test with this member's credential, whose answer
        carries the rate-limit headers and costs no pull.
        """
        response, _ = await self._request("HEAD", f"/v2/{PROBE_REPOSITORY}/manifests/latest", "probe",
                                          PROBE_REPOSITORY, {})
        await self._drain(response)
        self._expect(response, (200,), "rate-limit probe")

    # Plumbing

    def _expect(self, response, codes, kind: str) -> None:
        if response.code in codes:
            return
        if response.code == 404:
            raise UpstreamNotFound(kind)
        raise UpstreamError(f"{self.who} answered {response.code} for a {kind}", response.code)

    def _announced(self, digest: str) -> Digest:
        try:
            return Digest.parse(digest)
        except InvalidReference:
            self.log.warn("Upstream {upstream} sent a bad Docker-Content-Digest {digest}",
                          upstream=self.url, digest=digest[:100])
            raise UpstreamError(f"{self.who} sent a malformed Docker-Content-Digest", 502) from None

    async def _request(self, method: str, path: str, kind: str, name: str, extra, retry: bool = False):
        """
        One authenticated request, as (response, Authorization sent),
        retried when the caller allows it.
        """
        attempt = lambda: self._exchange(method, kind, lambda: self._authenticated(method, path, kind, name, extra))
        if not retry:
            return await attempt()
        return await self._retrying(method, path, attempt)

    async def _retrying(self, method: str, what: str, attempt):
        """
        Run ``attempt`` until it succeeds, retrying with jittered backoff a
        failure a retry can cure (a transport error or a 5xx), within the
        attempt count and time budget, and never once the failure has
        opened the circuit: the retry would be held back anyway.
        """
        start = self.clock.seconds()
        tries = 0
        while True:
            tries += 1
            try:
                return await attempt()
            except UpstreamError as e:
                delay = 0.2 * (2 ** (tries - 1)) * (0.5 + self._jitter())
                if (
                    isinstance(e, UpstreamHeld)
                    or self._health.open
                    or (e.status is not None and e.status < 500)
                    or tries >= self.timeouts.attempts
                    or self.clock.seconds() + delay - start > self.timeouts.retry_budget
                ):
                    raise
                self.log.info(
                    "Retrying {method} {what} in {delay:.2f}s after: {error}",
                    method=method, what=what, delay=delay, error=str(e),
                )
                await deferLater(self.clock, delay, lambda: None)

    async def _exchange(self, method: str, kind: str, attempt: Callable[[], Awaitable]):
        """
        One attempt at an exchange, through this registry's Health: held
        back while it is sick or paused, and its outcome remembered.  Any
        answer but a 5xx counts as the registry being up; a 429 pauses
        what it limits.
        """
        ticket = self._health.admit(counted=method == "GET" and kind == "manifest")
        try:
            result = await attempt()
        except _Limited as e:
            raise self._health.limited(ticket, e.pull_limit, e.retry_after) from None
        except UpstreamNotFound:
            self._health.answered(ticket)
            raise
        except UpstreamError as e:
            if e.status is None or e.status >= 500:
                self._health.failed(ticket, e)
            else:
                self._health.answered(ticket)
            raise
        except BaseException:
            self._health.released(ticket)
            raise
        self._health.answered(ticket)
        return result

    async def _authenticated(self, method: str, path: str, kind: str, name: str, extra):
        scope = f"repository:{name}:pull"
        url = self.url + path
        headers = Headers(extra)
        authorization = None
        if self._challenge is not None:
            authorization = await self.tokens.authorization(self._challenge, scope)
            headers.setRawHeaders(b"Authorization", [authorization])
        response = await self._send(method, url, headers, kind)
        if response.code == 401:
            challenge = parse_challenge(header(response.headers, b"www-authenticate"))
            await self._drain(response)
            if challenge is None:
                raise UpstreamError(f"{self.who} answered 401 without a challenge", 401)
            if authorization is not None and challenge.error == "insufficient_scope":
                # Docker Hub's answer for a repo that is missing or private.
                raise UpstreamNotFound(name)
            if authorization is not None:
                self.tokens.invalidate(challenge, scope)
            self._challenge = challenge
            authorization = await self.tokens.authorization(challenge, scope)
            headers.setRawHeaders(b"Authorization", [authorization])
            response = await self._send(method, url, headers, kind)
            if response.code == 401:
                again = parse_challenge(header(response.headers, b"www-authenticate"))
                await self._drain(response)
                if again is not None and again.error == "insufficient_scope":
                    raise UpstreamNotFound(name)
                self.log.error("Upstream {upstream} refused regcache's credentials", upstream=self.url)
                raise UpstreamError(f"{self.who} refused regcache's credentials", 401)
        if response.code == 429:
            raise _Limited(await self._says_pull_limit(response), retry_after(response.headers))
        if response.code >= 500:
            await self._drain(response)
            raise UpstreamError(f"{self.who} answered {response.code}", response.code)
        return response, authorization

    async def _send(self, method: str, url: str, headers: Headers, kind: str):
        started = self.clock.seconds()
        headers.setRawHeaders(b"User-Agent", [USER_AGENT])
        send = lambda: self.http.request(method, url, headers=headers, unbuffered=True, allow_redirects=False)
        try:
            response = await self.limits.answer(send, self._who(url), f"sending {method} {url.split('?')[0]}")
        except UpstreamTimeout:
            self._count(method, kind, "timeout")
            raise
        except UpstreamError:
            self._count(method, kind, "error")
            raise
        self._count(method, kind, response.code, response.headers)
        limit, window = ratelimit(response.headers, b"ratelimit-limit")
        remaining, _ = ratelimit(response.headers, b"ratelimit-remaining")
        self._health.observe(limit, remaining, window,
                             counted=method == "GET" and kind == "manifest" and response.code == 200)
        self.log.info(
            "upstream {method} {url} {status} in {duration:.3f}s",
            method=method, url=url.split("?")[0], status=response.code, kind=kind, bytes=_length(response),
            duration=self.clock.seconds() - started, upstream=self.key, member=self.host, event="upstream",
        )
        return response

    def _count(self, method: str, kind: str, status, headers=None) -> None:
        """One exchange (its code, or "timeout" or "error"), for the metrics and the pull accounting."""
        self.metrics.upstream_exchange(self.key, self.host, self.credential, _EXCHANGES[method, kind], status,
                                       headers, self.clock.seconds())

    def _who(self, url: str) -> str:
        """The registry itself, or the host it redirected a blob to."""
        netloc = urlsplit(url).netloc
        return self.who if netloc == self.host else f"blob host {netloc}"

    async def _drain(self, response) -> None:
        await self.limits.discard(response, self.who)

    async def _says_pull_limit(self, response) -> bool:
        """
        Whether a 429 is Docker Hub's pull limit, from at most
        MAX_429_BODY bytes of its body; one that cannot be read is taken
        for the abuse limit, the safer pause.
        """
        try:
            body = await self.limits.read(response, MAX_429_BODY, self.who, "429 page")
        except UpstreamError:
            return False
        return PULL_LIMIT_WORDS in body.lower()


class _Limited(UpstreamError):
    """A 429, on its way from the request to the Health that pauses for it."""

    def __init__(self, pull_limit: bool, retry_after: Optional[float]):
        super().__init__("rate limited", 429, retry_after)
        self.pull_limit = pull_limit


#: (method, kind of _send) -> the exchange kind the metrics and accounting count.
_EXCHANGES = {
    ("GET", "token"): "token",
    ("GET", "manifest"): "manifest_get", ("HEAD", "manifest"): "manifest_head",
    ("GET", "blob"): "blob", ("GET", "blob-redirect"): "blob",
    ("HEAD", "blob"): "blob_head", ("HEAD", "blob-redirect"): "blob_head",
    ("GET", "tags"): "tags", ("GET", "referrers"): "referrers", ("HEAD", "probe"): "probe",
}


class _TokenRequests:
    """
    The HTTP client as the token cache uses it, each token request
    reported as an exchange like any other this upstream sends.
    """

    def __init__(self, http, count):
        self._http = http
        self._count = count

    def get(self, url, **kwargs):
        def answered(response):
            self._count("GET", "token", response.code)
            return response

        def failed(failure):
            self._count("GET", "token", "timeout" if failure.check(CancelledError) else "error")
            return failure

        return self._http.get(url, **kwargs).addCallbacks(answered, failed)


class ResponseStream:
    """
    A BlobStream over one HTTP response to a blob GET, resumed with
    ``resume`` (another GET, with Range, of the same upstream).
    """

    def __init__(self, response, total: Optional[int], start: int, source: str, idle: float,
                 resume: Callable[[int], Awaitable[BlobStream]]):
        self.total = total
        self.start = start
        self.source = source
        self.idle = idle
        self._response = response
        self._resume = resume

    def deliver(self, protocol) -> None:
        self._response.deliverBody(protocol)

    def abandon(self) -> None:
        abandon(self._response)

    def resume(self, offset: int) -> Awaitable[BlobStream]:
        return self._resume(offset)


def blob_stream(response, offset: int, source: str, idle: float,
                resume: Callable[[int], Awaitable[BlobStream]]) -> ResponseStream:
    """
    The stream of a 200 or 206 ``response`` to a GET of a blob from
    ``offset``.  A 206 must start at ``offset`` exactly; one that starts
    anywhere else, or whose Content-Range cannot be read, is given up with
    its connection and raised as an UpstreamError.  A 200 is the whole blob,
    whatever was asked: its stream starts at 0 and the reader skips what it
    has (skipping here would hide from the reader's idle timer the bytes
    that do arrive).
    """
    try:
        total, start = _extent(response, offset, f"upstream {source}")
    except UpstreamError:
        abandon(response)
        raise
    return ResponseStream(response, total, start, source, idle, resume)


def _extent(response, offset: int, who: str):
    """(size of the whole blob or None, offset of the first byte) of a blob response."""
    if response.code != 206:
        return _length(response), 0
    value = header(response.headers, b"content-range") or ""
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    start = decimal(span.split("-")[0])
    if start is None:
        raise UpstreamError(f"{who} sent a malformed Content-Range: {value[:80]}", 502)
    if unit != "bytes" or start != offset:
        raise UpstreamError(f"{who} resumed the blob at the wrong place: {value[:80]}", 502)
    size = decimal(total)
    if size is not None:
        return size, start
    length = _length(response)
    return (start + length if length is not None else None), start


def _length(response) -> Optional[int]:
    """
    The body length upstream announced.  Twisted's client takes
    Content-Length out of the headers and puts it here.
    """
    length = getattr(response, "length", UNKNOWN_LENGTH)
    return None if length is UNKNOWN_LENGTH or length is None else length


def _accept(types) -> dict:
    return {b"Accept": [", ".join(types).encode("latin-1")]} if types else {}


def _origin(url: str):
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port
