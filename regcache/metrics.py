# test-case-name: tests.test_metrics
"""
Every counter regcache keeps, in one place, exposed for Prometheus.

Each component is handed the one Metrics object and records into it; nothing
else keeps counts.  The registry is per instance, not prometheus-client's
global one, so tests and several mirrors in one process never share numbers.
"""

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from twisted.web.resource import Resource

from regcache.accounting import RateLimit
from regcache.routes import split_path

# prometheus-client adds a ``_created`` gauge beside every counter and
# histogram series: it doubles the exposition, and Prometheus itself ignores
# it unless told otherwise.  Off for the process (it is a module setting).
disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Request labels come from these sets only: a label value made from what a
# client sent (a path, a method) would be a new series, kept for ever, per
# distinct request.

#: The routes' kinds; "other" is whatever no route serves.
REQUEST_ROUTES = ("root", "healthz", "readyz", "metrics", "v2", "manifests", "blobs", "tags", "referrers", "other")
_FIXED_ROUTES = {b"/": "root", b"/healthz": "healthz", b"/readyz": "readyz", b"/metrics": "metrics",
                 b"/v2": "v2", b"/v2/": "v2"}
REQUEST_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other")
_STATUS_CODES = (200, 206, 304, 307, 308, 400, 401, 403, 404, 405, 408, 413, 414, 416, 429, 500, 502, 503, 504)
#: Why a client login failed (regcache.clientauth); fixed, like every label.
AUTH_FAILURE_REASONS = ("bad_password", "unknown_user", "malformed", "throttled", "busy")
#: The codes regcache answers with, else the code's class.
REQUEST_STATUSES = tuple(str(c) for c in _STATUS_CODES) + ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


def status_label(code) -> str:
    """The label of a status code, whoever sent it: a known code, else its class."""
    if code in _STATUS_CODES:
        return str(code)
    if isinstance(code, int) and 100 <= code < 600:
        return f"{code // 100}xx"
    return "other"


def _split(path: bytes):
    """(route, repository name or None) of a request path."""
    route = _FIXED_ROUTES.get(path)
    if route is not None:
        return route, None
    parts = split_path(path[len(b"/v2/"):].decode("latin-1")) if path.startswith(b"/v2/") else None
    return (parts[1], parts[0]) if parts else ("other", None)


def _method_label(method: bytes) -> str:
    name = method.decode("latin-1")
    return name if name in REQUEST_METHODS else "other"


#: What a cache lookup can come to (X-Cache): "join" is a client that
#: followed another's download (the dedupe saving).  Policy denials are
#: counted by the policy's own counter.
CACHE_RESULTS = ("hit", "miss", "join", "revalidated", "stale", "unreadable", "redirect")
#: The routes whose answers are timed and whose bytes count as cache bytes.
_TIMED = {"manifests": "manifest", "blobs": "blob"}
#: Upstream exchange kinds (regcache_upstream_requests_total's ``kind``).
UPSTREAM_KINDS = ("token", "manifest_get", "manifest_head", "blob", "blob_head", "tags", "referrers", "probe")
#: Upstream statuses besides a code: no answer in time, or none at all.
UPSTREAM_FAILURES = ("timeout", "error")

#: Seconds: from a cached manifest's milliseconds to a cold multi-GiB blob.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class Metrics:
    """
    ``accounting`` (regcache.accounting), when given, hears of every
    upstream exchange too; ``repositories`` are the names (as clients send
    them, or ``library/<name>`` for Docker Hub's) whose requests are also
    counted by name: an operator's opt-in allow-list, as any other name
    would be a series per repository a client invents.
    """

    def __init__(self, accounting=None, repositories=()) -> None:
        self.accounting = accounting
        self.repositories = frozenset(repositories)
        #: count_request's series by (route, method, status, cache result) label.
        self._answered = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "regcache_requests", "Client requests answered", ["route", "method", "status"], registry=r
        )
        self.cache = Counter(
            "regcache_cache_lookups",
            "Cache lookups by kind (blob, manifest, tag, referrers) and result "
            "(hit, miss, join, revalidated, stale, unreadable, redirect)",
            ["kind", "result"], registry=r,
        )
        self.cache_bytes = Counter(
            "regcache_cache_bytes",
            "Bytes of manifest and blob answers sent to clients, by kind and cache result",
            ["kind", "result"], registry=r,
        )
        self.first_byte = Histogram(
            "regcache_response_first_byte_seconds",
            "Time from a manifest or blob request's arrival to the first byte of its answer",
            ["kind"], buckets=_BUCKETS, registry=r,
        )
        self.duration = Histogram(
            "regcache_response_duration_seconds",
            "Time from a manifest or blob request's arrival to the end of its answer",
            ["kind"], buckets=_BUCKETS, registry=r,
        )
        self.repository_requests = Counter(
            "regcache_repository_requests",
            "Client requests of the repositories in the metrics.repositories allow-list",
            ["repository", "route"], registry=r,
        )
        # ``member`` is the host of the one registry of an upstream's chain
        # that was asked (the upstream's own host when it has one URL): a
        # configured value, never one a client chose.
        self.upstream_requests = Counter(
            "regcache_upstream_requests",
            "Requests sent upstream, by kind (token, manifest_get = a counted pull, manifest_head, blob, ...) "
            "and status (the code, or timeout or error when none came)",
            ["upstream", "member", "kind", "status"], registry=r,
        )
        self.upstream_pulls = Counter(
            "regcache_upstream_pulls",
            "Manifest GETs upstream answered: what Docker Hub counts as pulls",
            ["upstream", "member"], registry=r,
        )
        self.upstream_bytes = Counter(
            "regcache_upstream_blob_bytes", "Blob bytes received from upstream", ["upstream"], registry=r
        )
        self.served_bytes = Counter(
            "regcache_served_blob_bytes",
            "Blob bytes sent to clients, by sender: sendfile (plain TCP) or read (TLS and other transports)",
            ["sender"], registry=r,
        )
        for sender in ("sendfile", "read"):
            self.served_bytes.labels(sender)
        self.fills = Counter(
            "regcache_blob_fills", "Blob downloads into the cache by outcome", ["result"], registry=r
        )
        self.inflight = Gauge(
            "regcache_inflight_downloads", "Blob downloads from upstream under way", registry=r
        )
        self.inflight_clients = Gauge(
            "regcache_inflight_clients",
            "Clients following a blob download under way: more than the downloads is the dedupe saving",
            registry=r,
        )
        self.store_bytes = Gauge(
            "regcache_store_bytes", "Bytes of complete blobs and manifests in the cache", registry=r
        )
        self.store_limit = Gauge(
            "regcache_store_limit_bytes",
            "The cache's size limit now (--max-size, or lower after a full disk); +Inf when unlimited",
            registry=r,
        )
        self.store_entries = Gauge(
            "regcache_store_entries", "Blobs and manifests in the cache", registry=r
        )
        self.store_indexed = Gauge(
            "regcache_store_indexed",
            "1 once the start-up index of the store is complete (eviction runs from then on), else 0",
            registry=r,
        )
        # ``result``: confirmed, unknown (upstream has no such content in
        # that repository) or failed (upstream could not answer).
        self.link_confirmations = Counter(
            "regcache_link_confirmations",
            "HEADs upstream asking whether a repository holds content regcache has cached for another",
            ["upstream", "result"], registry=r,
        )
        # The shared level (regcache.shared): ``kind`` blob, blob_head,
        # manifest, tag; ``result`` hit, miss or failed (the bucket did not
        # answer in time, or erred: the request went on without it).
        self.shared_lookups = Counter(
            "regcache_shared_lookups",
            "Looks into the shared bucket for what the local store lacks, by kind and result",
            ["kind", "result"], registry=r,
        )
        self.shared_bytes = Counter(
            "regcache_shared_blob_bytes",
            "Blob bytes received from the shared level instead of upstream: the bucket, or another replica",
            ["source"], registry=r,
        )
        # ``result``: uploaded, present (another replica's copy was there
        # first) or failed.
        self.shared_uploads = Counter(
            "regcache_shared_uploads", "Content this replica put into the shared bucket, by kind and result",
            ["kind", "result"], registry=r,
        )
        # ``result``: won (created), taken_over (replaced an expired one),
        # lost (another replica holds it, live) or failed (the bucket erred
        # or was late: this replica fetched alone).
        self.leases = Counter(
            "regcache_leases", "Claims of the lease on a blob download across replicas, by result",
            ["result"], registry=r,
        )
        # ``direction``: sent (this replica asked the lease holder) or served
        # (a peer asked this one); ``result`` ok, failed, and for served also
        # denied (no valid signature) or missing (neither held nor downloading).
        self.forwards = Counter(
            "regcache_forwards", "Blob requests forwarded between replicas, by direction and result",
            ["direction", "result"], registry=r,
        )
        # ``reason``: unavailable (the coordinator erred or was late) or
        # contended (holders that could not send it, round after round).
        self.coordinator_fallbacks = Counter(
            "regcache_coordinator_fallbacks",
            "Blob downloads this replica made without a lease, the coordinator being unable to settle one",
            ["reason"], registry=r,
        )
        self.shared_sweeps = Counter(
            "regcache_shared_sweeps",
            "Rounds of the bucket's sweeper: swept (this replica held the sweeper lease), not_holder, failed",
            ["result"], registry=r,
        )
        self.shared_evicted = Counter(
            "regcache_shared_evicted", "Objects evicted from the bucket to keep it under --s3-max-size", ["kind"],
            registry=r,
        )
        self.shared_bucket_bytes = Gauge(
            "regcache_shared_bucket_bytes", "Bytes of blobs in the bucket at this replica's last sweep", registry=r,
        )
        self.evicted = Counter(
            "regcache_evicted", "Entries evicted to keep the cache under its size limit", ["kind"], registry=r
        )
        self.client_connections = Gauge(
            "regcache_client_connections", "Open client connections", registry=r
        )
        self.client_limits = Counter(
            "regcache_client_limits",
            "Clients turned away by a limit: head_timeout, progress_timeout, max_connections, max_per_client",
            ["limit"], registry=r,
        )
        for limit in ("head_timeout", "progress_timeout", "max_connections", "max_per_client"):
            self.client_limits.labels(limit)
        member = ["upstream", "member"]
        self.ratelimit_limit = Gauge(
            "regcache_upstream_ratelimit_limit", "Latest ratelimit-limit from upstream", member, registry=r
        )
        self.ratelimit_remaining = Gauge(
            "regcache_upstream_ratelimit_remaining", "Latest ratelimit-remaining from upstream", member, registry=r
        )
        self.ratelimit_window = Gauge(
            "regcache_upstream_ratelimit_window_seconds", "The window of the latest ratelimit-limit", member,
            registry=r,
        )
        # The names of the community's Docker Hub rate-limit exporters
        # (drl-exporter's), so their dashboards work against regcache.
        account = ["upstream", "member", "credential"]
        self.hub_limit = Gauge(
            "dockerhub_limit_max_requests_total", "Docker Hub rate limit: pulls allowed in the window", account,
            registry=r,
        )
        self.hub_remaining = Gauge(
            "dockerhub_limit_remaining_requests_total", "Docker Hub rate limit: pulls left in the window",
            account, registry=r,
        )
        self.hub_window = Gauge(
            "dockerhub_limit_max_requests_time", "Docker Hub rate limit: the window, in seconds", account,
            registry=r,
        )
        # ``rule`` is a rule's index in its upstream's policy, or "default":
        # bounded by the config file, never by what clients ask for.
        self.policy_denials = Counter(
            "regcache_policy_denials", "Pulls the pull policy denied, by upstream and rule", ["upstream", "rule"],
            registry=r,
        )
        self.reloads = Counter(
            "regcache_reloads",
            "Reloads on SIGHUP by what was reloaded (policy, credentials, tls) and result (ok, failed)",
            ["what", "result"], registry=r,
        )
        # 0 up, 1 failing (errors, circuit still closed), 2 open (health.py).
        self.circuit_state = Gauge(
            "regcache_upstream_circuit_state",
            "Circuit of each upstream registry: 0 up, 1 failing, 2 open (not contacted but for one probe)",
            ["upstream", "member"], registry=r,
        )
        # ``reason`` is one of AUTH_FAILURE_REASONS: never a user name, an
        # address or anything else a client chose.
        self.client_auth_failures = Counter(
            "regcache_client_auth_failures", "Client logins refused, by reason", ["reason"], registry=r,
        )
        for reason in AUTH_FAILURE_REASONS:
            self.client_auth_failures.labels(reason)

    def upstream_exchange(self, upstream: str, member: str, credential: str, kind: str, status,
                          headers=None, now: Optional[float] = None) -> None:
        """
        One request sent upstream (``kind`` from UPSTREAM_KINDS), answered
        with the code ``status`` and ``headers``, or failed ("timeout",
        "error").  A manifest GET answered 2xx or 3xx is a counted pull.
        """
        code = status if isinstance(status, int) else None
        self.upstream_requests.labels(upstream, member, kind,
                                      status if code is None else status_label(code)).inc()
        if kind == "manifest_get" and code is not None and 200 <= code < 400:
            self.upstream_pulls.labels(upstream, member).inc()
        seen = RateLimit.parse(headers, now) if headers is not None else None
        if seen is not None:
            self._ratelimit(upstream, member, credential, seen)
        if self.accounting is not None:
            self.accounting.exchange(upstream, member, credential, kind, code, seen)

    def _ratelimit(self, upstream: str, member: str, credential: str, seen: RateLimit) -> None:
        for value, ours, hubs in ((seen.limit, self.ratelimit_limit, self.hub_limit),
                                  (seen.remaining, self.ratelimit_remaining, self.hub_remaining),
                                  (seen.window, self.ratelimit_window, self.hub_window)):
            if value is not None:
                ours.labels(upstream, member).set(value)
                hubs.labels(upstream, member, credential).set(value)

    def blob_bytes(self, upstream: str, member: str, n: int) -> None:
        """``n`` blob bytes received from an upstream's member."""
        self.upstream_bytes.labels(upstream).inc(n)
        if self.accounting is not None:
            self.accounting.blob_bytes(upstream, member, n)

    def count_request(self, path: bytes, method: bytes, code: int, cache: Optional[str] = None,
                      sent: int = 0, first_byte: Optional[float] = None, took: Optional[float] = None) -> None:
        """
        One answered request: its route, method and status; for a manifest
        or blob, the bytes sent by cache result and the times to its first
        byte and its end (seconds, None when it sent nothing).
        """
        route, name = _split(path)
        key = (route, _method_label(method), status_label(code), cache if cache in CACHE_RESULTS else None)
        series = self._answered.get(key)
        if series is None:
            series = self._answered[key] = self._series(*key)
        requests, sent_bytes, first, whole = series
        requests.inc()
        if name is not None and self.repositories:
            known = name if name in self.repositories else f"library/{name}" if "/" not in name else None
            if known in self.repositories:
                self.repository_requests.labels(known, route).inc()
        if sent_bytes is not None:
            sent_bytes.inc(sent)
        if first is not None and first_byte is not None:
            first.observe(first_byte)
        if whole is not None and took is not None:
            whole.observe(took)

    def _series(self, route: str, method: str, status: str, cache: Optional[str]):
        """
        The series one kind of answer counts into, looked up once: a
        labels() call per series per request is a tenth of what regcache
        itself spends on a cached manifest.  Every label is one of a fixed
        few values, so the table of them stays small.
        """
        kind = _TIMED.get(route)
        if kind is None:
            return self.requests.labels(route, method, status), None, None, None
        return (self.requests.labels(route, method, status),
                self.cache_bytes.labels(kind, cache) if cache is not None else None,
                self.first_byte.labels(kind), self.duration.labels(kind))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Exposition(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        body = self.metrics.render()
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body


def metrics_resource(metrics: Metrics) -> Resource:
    """The whole of the --metrics-listen port: /metrics, and a 404 for anything else."""
    root = Resource()
    root.putChild(b"metrics", _Exposition(metrics))
    return root
