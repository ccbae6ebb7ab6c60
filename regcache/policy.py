"""
Decisions, kept apart from mechanism: which upstream serves a request, when
a cached tag is fresh, and when a stale one may stand in for an upstream
that is failing.

Every pull passes through ``Policy.route`` first.  It is the one place that
turns what the client asked for into what regcache will do, so a pull policy
(allow and deny lists, client identity) and several upstreams (``?ns=``)
extend it rather than every handler.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

from regcache.errors import RegistryError, UpstreamError
from regcache.reference import check_name
from regcache.remote import Remote
from regcache.tags import TagEntry


@dataclass(frozen=True)
class Route:
    """
    Where a request goes: the upstream, and the repository as that upstream
    names it (``library/alpine`` for Docker Hub's ``alpine``).
    """

    upstream: Remote
    name: str


class Policy:
    def __init__(self, upstreams: Sequence[Remote], clock, tag_ttl: float, max_stale: Optional[float]):
        if not upstreams:
            raise ValueError("at least one upstream")
        self.upstreams = list(upstreams)
        self.clock = clock
        self.tag_ttl = tag_ttl
        self.max_stale = max_stale

    def route(self, name: str, ns: Optional[str] = None) -> Route:
        """
        Decide which upstream serves ``name``.  containerd's ``?ns=`` names
        the registry the client meant; with one upstream it is accepted and
        the one upstream serves it.
        """
        check_name(name)
        upstream = self.upstreams[0]
        return Route(upstream, check_name(upstream.repository(name)))

    def fresh(self, entry: TagEntry) -> bool:
        """
        A tag checked within the revalidation window is served from cache
        with no upstream call at all.
        """
        return self.clock.seconds() - entry.checked < self.tag_ttl

    def stale_allowed(self, entry: Optional[TagEntry]) -> bool:
        """
        Whether a tag may be served from cache while its revalidation
        failed: always, unless --max-stale bounds its age.  The bound is
        strict, so that 0 serves nothing stale, even a tag checked this
        very instant.
        """
        if entry is None:
            return False
        if self.max_stale is None:
            return True
        return self.clock.seconds() - entry.checked < self.max_stale

    def failure(self, error: UpstreamError, what: str) -> RegistryError:
        """
        The client's error when upstream failed and nothing cached can
        stand in: what was asked for, then what upstream did, in the
        UpstreamError's own words (which name the upstream).
        """
        if error.rate_limited:
            wait = int(error.retry_after) if error.retry_after else 60
            return RegistryError(
                "TOOMANYREQUESTS", f"{what} is not cached and {error}",
                headers={"Retry-After": str(max(wait, 1))},
            )
        return RegistryError("UNAVAILABLE", f"{what} is not cached and {error}", status=503)
