# test-case-name: tests.test_routes
"""
The HTTP face of regcache: the registry v2 pull routes on a Klein app.

Handlers only translate: the request path into a name and a route, the
request into a domain call on the Mirror, the answer into status, headers
and body, and every RegistryError (and every InvalidReference the grammar
raised) into OCI error JSON in one handler.  Nothing here decides what is
cached.
"""

import json
import re
from dataclasses import replace
from urllib.parse import urlencode

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import HTTPException

from regcache import __version__, body
from regcache.errors import RegistryError
from regcache.identity import EVERYONE
from regcache.logs import printable
from regcache.site import MAX_LOGGED_PATH
from regcache.manifests import OCI_INDEX
from regcache.reference import Digest, InvalidReference, is_digest

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
PULL_METHODS = ["GET", "HEAD"]

#: The OCI code a client gets for each kind of reference the grammar
#: refuses; an unverifiable algorithm is a bad digest, as distribution
#: answers it (the request is fine but for its digest).
REFERENCE_CODES = {"name": "NAME_INVALID", "tag": "TAG_INVALID", "digest": "DIGEST_INVALID",
                   "algorithm": "DIGEST_INVALID"}


def split_path(path: str):
    """
    Split what follows ``/v2/`` into (name, kind, rest), routing on the last
    ``/manifests/``, ``/blobs/``, ``/referrers/`` or ``/tags/list`` so that
    a name may itself contain those words as components.  Returns None for
    no match.
    """
    if path.endswith("/tags/list"):
        return path[: -len("/tags/list")], "tags", ""
    best = None
    for kind in ("manifests", "blobs", "referrers"):
        i = path.rfind(f"/{kind}/")
        if i > 0 and (best is None or i > best[0]):
            best = (i, kind)
    if best is None:
        return None
    i, kind = best
    return path[:i], kind, path[i + len(kind) + 2 :]


def merged_accept(request) -> list:
    """
    Every media type of every Accept header, in order, without parameters:
    dockerd sends one header per type, containerd one comma-joined header.
    """
    types = {}
    for line in request.requestHeaders.getRawHeaders(b"accept", []):
        for part in line.decode("latin-1").split(","):
            t = part.split(";")[0].strip()
            if t:
                types[t] = None
    return list(types)


def sized(request, body) -> bytes:
    """
    A small body with its Content-Length, so it is not sent chunked: some
    clients read error bodies only from a sized response.
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    request.setHeader("Content-Length", str(len(body)))
    return body


def _with_ns(link: bytes, ns: str) -> bytes:
    """A Link header value whose URL carries ``?ns=`` too."""
    def add(m):
        url = m.group(1)
        return b"<" + url + (b"&" if b"?" in url else b"?") + urlencode({"ns": ns}).encode("latin-1") + b">"

    return re.sub(rb"<([^>]*)>", add, link, count=1)


class RegistryRoutes:
    app = Klein()
    # A doubled slash must reach the name check and be refused, not be
    # redirected by werkzeug to a path the client never asked for.
    app.url_map.merge_slashes = False
    log = Logger()

    def __init__(self, mirror, policy, metrics, reactor, not_ready, status=None, serve_metrics: bool = True,
                 gate=None, peers=None):
        """
        ``not_ready()`` is None when this process should get clients, else
        why not (regcache.readiness).  ``status`` (regcache.status.Status)
        serves /status and counts the most pulled images; None: no page.
        ``serve_metrics`` is False when /metrics has a port of its own
        (--metrics-listen), so it need not be public.  ``gate``
        (regcache.clientauth) says who each registry request comes from;
        without one, it is EVERYONE.  ``peers`` (regcache.peers.PeerBlobs)
        serves other replicas the blobs this one downloads; None: no peer route.
        """
        self.serve_metrics = serve_metrics
        self.mirror = mirror
        self.policy = policy
        self.metrics = metrics
        self.reactor = reactor
        self.not_ready = not_ready
        self.status = status
        self.gate = gate
        self.peers = peers

    async def _identify(self, request, ping: bool = False):
        """
        Who sent ``request``, before anything else about it is looked at: a
        client that may not use the registry API learns nothing from it,
        not even whether a path or name is valid.  ``ping``: the ``/v2/``
        check (see clientauth.Gate.identify).
        """
        identity = EVERYONE if self.gate is None else await self.gate.identify(request, ping)
        request.identity = identity
        return identity

    # Probes and metrics

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request):
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return sized(request, f"regcache {__version__}: a pull-through registry cache. The API is under /v2/.\n")

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request):
        request.setHeader("Content-Type", "text/plain")
        return sized(request, b"ok\n")

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request):
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        problem = self.not_ready()
        if problem:
            request.setResponseCode(503)
            return sized(request, f"not ready: {problem}\n")
        return sized(request, b"ready\n")

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request):
        from regcache.metrics import CONTENT_TYPE

        if not self.serve_metrics:
            request.setResponseCode(404)
            request.setHeader("Content-Type", "text/plain; charset=utf-8")
            return sized(request, b"/metrics is served on the --metrics-listen port\n")
        request.setHeader("Content-Type", CONTENT_TYPE)
        return sized(request, self.metrics.render())

    # The status page

    @app.route("/status", methods=["GET", "HEAD"])
    async def status_page(self, request):
        await self._status_reader(request)
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        # Inline styles only; nothing else may load or run.
        request.setHeader("Content-Security-Policy",
                          "default-src 'none'; style-src 'unsafe-inline'; img-src data:")
        request.setHeader("Cache-Control", "no-store")
        return sized(request, await self.status.render(self._visible(request)))

    @app.route("/status.json", methods=["GET", "HEAD"])
    async def status_json(self, request):
        await self._status_reader(request)
        request.setHeader("Content-Type", "application/json")
        request.setHeader("Cache-Control", "no-store")
        return sized(request, json.dumps(self.status.collect(self._visible(request)), indent=1) + "\n")

    async def _status_reader(self, request) -> None:
        """
        Who may read the status page: with client authentication on, a
        client that logged in or is on a trusted network, as for the /v2/
        check; it names the images others pulled, so an anonymous
        ``cached-only`` or ``allow`` client does not see it.
        """
        await self._identify(request, ping=True)
        if self.status is None:
            raise RegistryError("NAME_UNKNOWN", "no status page here", status=404)

    def _visible(self, request):
        """
        Which repositories the status page may name to this reader: those
        the pull policy lets it pull, so that a logged-in client learns no
        private repository's name from what others pulled.
        """
        client = request.identity
        return lambda upstream, name: self.policy.pulls.allows(upstream, name, client)

    # The registry API

    # The registry routes take every method, so that a push or an OPTIONS
    # gets the registry's own refusal.  /v2 is answered as /v2/: werkzeug's
    # redirect would carry no Location and cost a round trip for nothing.
    @app.route("/v2/", strict_slashes=False)
    async def base(self, request):
        request.setHeader(*API_VERSION)
        await self._identify(request, ping=True)
        if request.method not in (b"GET", b"HEAD"):
            raise RegistryError("UNSUPPORTED", "regcache is a read-only mirror")
        request.setHeader("Content-Type", "application/json")
        return sized(request, b"{}")

    @app.route("/v2/_catalog")
    async def catalog(self, request):
        """
        A mirror knows only what its clients happened to ask for, and a
        list of it would show every client the repositories (private ones
        too) that others pulled; Docker Hub offers no catalog either.
        """
        request.setHeader(*API_VERSION)
        await self._identify(request)
        raise RegistryError("UNSUPPORTED", "regcache is a mirror and offers no catalog", status=404)

    @app.route("/v2/<path:rest>")
    async def api(self, request, rest):
        request.setHeader(*API_VERSION)
        identity = await self._identify(request)
        # Route on the raw path: Klein has percent-decoded ``rest``, and an
        # encoded slash or dot must not slip into a name.
        raw = request.path.decode("latin-1")
        if "%" in raw or "\\" in raw:
            raise RegistryError("NAME_INVALID", "encoded characters are not allowed in registry paths")
        parts = split_path(raw[len("/v2/"):])
        if parts is None:
            raise RegistryError("UNSUPPORTED", "not a registry v2 pull path", status=404)
        name, kind, reference = parts
        ns = request.args.get(b"ns", [b""])[0].decode("latin-1") or None
        route = replace(self.policy.route(name, ns), client=identity)
        request.upstream = route.registry.name
        if route.ns is not None:
            # The distribution spec's proxying section: a registry that used
            # ns says so.
            request.setHeader("OCI-Namespace", route.ns)
        if request.method not in (b"GET", b"HEAD"):
            raise RegistryError("UNSUPPORTED", "regcache is a read-only mirror: pushes are not supported")
        self.policy.check(route, kind, reference)
        if kind == "manifests":
            return await self._manifest(request, route, reference)
        if kind == "blobs":
            return await self._blob(request, route, reference)
        if kind == "referrers":
            return await self._referrers(request, route, reference)
        return await self._tags(request, route, name)

    async def _manifest(self, request, route, reference):
        answer = await self.mirror.manifest(
            route, reference, merged_accept(request), want_body=request.method == b"GET"
        )
        self._cache_result(request, answer.cache)
        if self.status is not None and not is_digest(reference):
            self.status.pulled(route.registry.name, route.name)
        request.setHeader("Content-Type", answer.media_type)
        request.setHeader("Docker-Content-Digest", str(answer.digest))
        request.setHeader("Etag", f'"{answer.digest}"')
        request.setHeader("Content-Length", str(answer.size))
        if answer.warning:
            request.setHeader("Warning", answer.warning)
        if request.method == b"HEAD":
            return b""
        return answer.body

    async def _blob(self, request, route, reference):
        digest = Digest.parse(reference)
        if request.method == b"HEAD":
            size, cache = await self.mirror.blob_size(route, digest)
            self._cache_result(request, cache)
            self._blob_headers(request, digest, size)
            return b""
        # The Host field, not getRequestHostname: regcache.site hides it from the router.
        location = await self.mirror.blob_location(route, digest, (request.getHeader(b"host") or b"").decode("latin-1"),
                                                   request.getHeader(b"authorization") is not None)
        if location is not None:
            self._cache_result(request, "redirect")
            request.setResponseCode(307)
            request.setHeader("Location", location)
            request.setHeader("Docker-Content-Digest", str(digest))
            return sized(request, b"")
        return await self._send_blob(request, digest, await self.mirror.blob(route, digest))

    async def _send_blob(self, request, digest, answer):
        # The answer owns a descriptor: whatever happens from here on, this
        # is where it is given back.
        try:
            self._cache_result(request, answer.cache)
            span = self._blob_headers(request, digest, answer.size)
            if span is None:
                return b""
            start, end = span
            return await body.send(request, answer, start, end, self.reactor, self.metrics)
        finally:
            answer.release()

    # Between replicas

    @app.route("/_regcache/blobs/<reference>", methods=["GET"])
    async def peer_blob(self, request, reference):
        """
        A blob for another replica (regcache.peers), signed by it: no client
        identity or pull policy here, the requester applied both.
        """
        if self.peers is None:
            raise RegistryError("NAME_UNKNOWN", "not found", status=404)
        digest, answer = await self.peers.answer(request, reference)
        return await self._send_blob(request, digest, answer)

    @staticmethod
    def _cache_result(request, cache: str) -> None:
        """
        The outcome (hit, miss, join, stale, revalidated) goes to the access
        log and to the client as ``X-Cache``: ``regcache prefetch`` reports
        from it what was already cached.
        """
        request.cache_result = cache
        request.setHeader("X-Cache", cache)

    def _blob_headers(self, request, digest, size: int):
        """
        Status and headers of a blob response of ``size`` bytes, and the
        span [start, end) its body holds; None for a 416, which has none.
        """
        try:
            span = body.parse_range(request.getHeader(b"range"), size)
        except body.Unsatisfiable:
            request.setResponseCode(416)
            request.setHeader("Content-Range", f"bytes */{size}")
            request.setHeader("Content-Length", "0")
            return None
        request.setHeader("Content-Type", "application/octet-stream")
        request.setHeader("Docker-Content-Digest", str(digest))
        request.setHeader("Etag", f'"{digest}"')
        request.setHeader("Accept-Ranges", "bytes")
        start, end = span if span else (0, size)
        if span:
            request.setResponseCode(206)
            request.setHeader("Content-Range", f"bytes {start}-{end - 1}/{size}")
        request.setHeader("Content-Length", str(end - start))
        return start, end

    async def _referrers(self, request, route, reference):
        digest = Digest.parse(reference)
        artifact_type = request.args.get(b"artifactType", [None])[0]
        answer = await self.mirror.referrers(
            route, digest, artifact_type.decode("utf-8", "replace") if artifact_type is not None else None
        )
        request.cache_result = answer.cache
        request.setHeader("Content-Type", OCI_INDEX)
        if answer.filtered:
            request.setHeader("OCI-Filters-Applied", "artifactType")
        if answer.warning:
            request.setHeader("Warning", answer.warning)
        body = sized(request, answer.body)
        return b"" if request.method == b"HEAD" else body

    async def _tags(self, request, route, name):
        # Only the pagination parameters go upstream; ``ns`` is ours.
        query = urlencode([(k, request.args[k][0]) for k in (b"n", b"last") if k in request.args])
        code, link, data = await self.mirror.tags_list(route, name, query.encode("ascii"))
        request.setResponseCode(code)
        request.setHeader("Content-Type", "application/json")
        if link and route.ns:
            # The next page must reach the same registry: the client follows
            # the Link as it is, without adding ns again.
            link = [_with_ns(v, route.ns) for v in link]
        if link:
            request.responseHeaders.setRawHeaders(b"Link", link)
        return sized(request, data)

    # Errors

    @app.handle_errors(RegistryError)
    def registry_error(self, request, failure):
        error = failure.value
        request.setResponseCode(error.status)
        request.setHeader("Content-Type", "application/json")
        for k, v in error.headers.items():
            request.setHeader(k, v)
        if error.status == 405 and not request.responseHeaders.hasHeader(b"allow"):
            # A 405 must say what is allowed (RFC 9110 §15.5.6); on a
            # read-only mirror's registry paths that is always a pull.
            request.setHeader("Allow", ", ".join(PULL_METHODS))
        if error.code == "UNAUTHORIZED" and not request.responseHeaders.hasHeader(b"www-authenticate"):
            request.setHeader("WWW-Authenticate", 'Basic realm="regcache"')
        request.error_code = error.code
        return sized(request, error.body())

    @app.handle_errors(InvalidReference)
    def invalid_reference(self, request, failure):
        error = failure.value
        return self.registry_error(request, Failure(RegistryError(REFERENCE_CODES[error.kind], error.message)))

    @app.handle_errors(HTTPException)
    def http_error(self, request, failure):
        """
        What the router itself refused.  Under /v2/ every well-formed path
        routes, so an unrouted one is a malformed name (``//etc/passwd``).
        """
        code = failure.value.code
        if code == 405:
            allowed = ", ".join(sorted(failure.value.valid_methods))
            error = RegistryError("UNSUPPORTED", "method not supported", headers={"Allow": allowed})
        elif request.path.startswith(b"/v2/"):
            error = RegistryError("NAME_INVALID", "not a valid registry path")
        else:
            error = RegistryError("NAME_UNKNOWN", "not found", status=code)
        return self.registry_error(request, Failure(error))

    @app.handle_errors(Exception)
    def unexpected(self, request, failure):
        self.log.failure("Unexpected error answering {method} {path}", failure,
                         method=printable(request.method.decode("latin-1")[:16]),
                         path=printable(request.path.decode("latin-1")[:MAX_LOGGED_PATH]))
        request.setResponseCode(500)
        request.setHeader("Content-Type", "application/json")
        return sized(request, json.dumps({"errors": [{"code": "UNKNOWN", "message": "internal error"}]}))
