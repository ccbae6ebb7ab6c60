# test-case-name: tests.test_metrics
"""
Every counter regcache keeps, in one place, exposed for Prometheus.

Each component is handed the one Metrics object and records into it; nothing
else keeps counts.  The registry is per instance, not prometheus-client's
global one, so tests and several mirrors in one process never share numbers.
"""

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from regcache.routes import split_path

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


def request_labels(path: bytes, method: bytes, code: int):
    """(route, method, status) labels of one answered request."""
    route = _FIXED_ROUTES.get(path)
    if route is None:
        parts = split_path(path[len(b"/v2/"):].decode("latin-1")) if path.startswith(b"/v2/") else None
        route = parts[1] if parts else "other"
    name = method.decode("latin-1")
    if name not in REQUEST_METHODS:
        name = "other"
    if code in _STATUS_CODES:
        status = str(code)
    else:
        status = f"{code // 100}xx" if 100 <= code < 600 else "other"
    return route, name, status


@dataclass
class RateLimit:
    """
    The latest rate-limit headers an upstream sent.
    """

    limit: Optional[int] = None
    remaining: Optional[int] = None
    window: Optional[int] = None
    source: Optional[str] = None
    seen: Optional[float] = None


_RL = re.compile(r"\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+))?")


def _parse_rl(value: Optional[str]):
    if not value:
        return None, None
    m = _RL.match(value)
    if not m:
        return None, None
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "regcache_requests", "Client requests answered", ["route", "method", "status"], registry=r
        )
        self.cache = Counter(
            "regcache_cache_lookups",
            "Cache lookups by kind (blob, manifest, tag, referrers) and result (hit, miss, join, revalidated, stale, unreadable)",
            ["kind", "result"], registry=r,
        )
        # ``member`` is the host of the one registry of an upstream's chain
        # that was asked (the upstream's own host when it has one URL): a
        # configured value, never one a client chose.
        self.upstream_requests = Counter(
            "regcache_upstream_requests", "Requests sent upstream",
            ["upstream", "member", "method", "kind", "status"], registry=r,
        )
        self.upstream_pulls = Counter(
            "regcache_upstream_pulls",
            "Manifest GETs sent upstream: what Docker Hub counts as pulls",
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
        self.store_bytes = Gauge(
            "regcache_store_bytes", "Bytes of complete blobs and manifests in the cache", registry=r
        )
        self.store_entries = Gauge(
            "regcache_store_entries", "Blobs and manifests in the cache", registry=r
        )
        self.evicted = Counter(
            "regcache_evicted", "Entries evicted to keep the cache under its size limit", ["kind"], registry=r
        )
        self.ratelimit_limit = Gauge(
            "regcache_upstream_ratelimit_limit", "Latest ratelimit-limit from upstream",
            ["upstream", "member"], registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "regcache_upstream_ratelimit_remaining", "Latest ratelimit-remaining from upstream",
            ["upstream", "member"], registry=r,
        )
        # ``reason`` is one of AUTH_FAILURE_REASONS: never a user name, an
        # address or anything else a client chose.
        self.client_auth_failures = Counter(
            "regcache_client_auth_failures", "Client logins refused, by reason", ["reason"], registry=r,
        )
        for reason in AUTH_FAILURE_REASONS:
            self.client_auth_failures.labels(reason)
        #: Keyed by (upstream, member): each registry of a chain counts its own pulls.
        self.ratelimits: Dict[Tuple[str, str], RateLimit] = {}

    def observe_ratelimit(self, upstream: str, member: str, headers, now: float) -> None:
        """
        Keep the latest rate-limit headers of an upstream answer.  Names are
        matched case-insensitively (twisted Headers does that) and the
        ``;w=`` window is kept.
        """
        limit, window = _parse_rl(_first(headers, b"ratelimit-limit"))
        remaining, rwindow = _parse_rl(_first(headers, b"ratelimit-remaining"))
        if limit is None and remaining is None:
            return
        rl = self.ratelimits.setdefault((upstream, member), RateLimit())
        rl.limit, rl.remaining, rl.window = limit, remaining, window or rwindow
        rl.source = _first(headers, b"docker-ratelimit-source")
        rl.seen = now
        if limit is not None:
            self.ratelimit_limit.labels(upstream, member).set(limit)
        if remaining is not None:
            self.ratelimit_remaining.labels(upstream, member).set(remaining)

    def count_request(self, path: bytes, method: bytes, code: int) -> None:
        self.requests.labels(*request_labels(path, method, code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _first(headers, name: bytes) -> Optional[str]:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None
