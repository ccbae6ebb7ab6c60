"""
Decisions, kept apart from mechanism: which upstream serves a request, when
a cached tag is fresh, and when a stale one may stand in for an upstream
that is failing.

Every pull passes through ``Policy.route`` first.  It is the one place that
turns what the client asked for into what regcache will do, so a pull policy
(allow and deny lists, client identity) and several upstreams (``?ns=``)
extend it rather than every handler.
"""

import re
from dataclasses import dataclass
from typing import FrozenSet, Optional, Sequence

from regcache.errors import RegistryError, UpstreamError
from regcache.headers import retry_after_seconds
from regcache.identity import EVERYONE, Identity
from regcache.reference import check_name
from regcache.remote import Remote
from regcache.rules import PullRules
from regcache.tags import TagEntry


@dataclass(frozen=True)
class Registry:
    """
    One configured upstream as routing sees it: the name its tags are kept
    under, the registry hosts and path alias that select it, the client
    that fetches from it, and its tag windows.
    """

    name: str
    hosts: FrozenSet[str]
    upstream: Remote
    tag_ttl: float
    max_stale: Optional[float]
    alias: Optional[str] = None
    #: How long a client with a cached copy waits for a tag check before
    #: that copy is served (mirror.py).
    revalidate_deadline: float = 0.3


@dataclass(frozen=True)
class Route:
    """
    Where a request goes: the registry, and the repository as its upstream
    names it (``library/alpine`` for Docker Hub's ``alpine``).  ``ns`` is
    the client's ``?ns=`` when it chose the registry, to echo back.
    """

    registry: Registry
    name: str
    ns: Optional[str] = None
    #: Who asked: the pull policy matches it, and the mirror contacts
    #: upstream for it only if it ``may_fetch``.
    client: Identity = EVERYONE

    @property
    def upstream(self):
        return self.registry.upstream


#: A registry host as a path's first component may spell it: the schema's
#: host pattern (config.schema.json).
HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")


def is_host(component: str) -> bool:
    """
    Whether a path's first component names a registry host, by the rule
    image references use: it has a dot or a port, or is ``localhost``.
    """
    return "." in component or ":" in component or component == "localhost"


class Policy:
    def __init__(self, registries: Sequence[Registry], clock, default: Optional[str] = None,
                 pulls: Optional[PullRules] = None):
        """
        ``pulls`` holds the pull policy's rules; without it every pull is
        allowed.
        """
        if not registries:
            raise ValueError("at least one upstream")
        self.registries = list(registries)
        self.clock = clock
        self.pulls = pulls or PullRules()
        self._by_host = {h.lower(): r for r in self.registries for h in r.hosts}
        self._by_alias = {r.alias: r for r in self.registries if r.alias}
        self.default = next(r for r in self.registries if r.name == default) if default else self.registries[0]

    def route(self, path_name: str, ns: Optional[str] = None) -> Route:
        """
        Decide which registry serves ``path_name`` (what followed ``/v2/``).
        containerd's ``?ns=`` names the registry; clients that cannot send
        it put the registry's host or alias first in the path; anything
        else is the default registry's.  A registry no upstream answers for
        is refused here, so nothing is fetched for it: its name must never
        be given another registry's content.  ``ns`` and the path are only
        ever keys into the configured upstreams, never places to connect to.
        """
        first, _, rest = path_name.partition("/")
        # The grammar first, so that a malformed name is a 400 whatever it
        # would have routed to.
        check_name(rest if rest and is_host(first) and HOST_RE.fullmatch(first) else path_name)
        if ns is not None:
            registry = self._lookup(ns)
            if rest and self._prefix(first) is registry:
                # A rewrite (k3s) or override_path put the prefix in too.
                path_name = rest
        elif rest and is_host(first):
            registry = self._lookup(first)
            path_name = rest
        elif rest and first in self._by_alias:
            registry, path_name = self._by_alias[first], rest
        else:
            registry = self.default
        return Route(registry, check_name(registry.upstream.repository(path_name)), ns)

    def _prefix(self, component: str) -> Optional[Registry]:
        if is_host(component):
            return self._by_host.get(component.lower())
        return self._by_alias.get(component)

    def _lookup(self, host: str) -> Registry:
        registry = self._by_host.get(host.lower())
        if registry is None:
            raise RegistryError(
                "NAME_UNKNOWN", f"registry {host[:255]!r} is not mirrored here: no upstream answers for it"
            )
        return registry

    def check(self, route: Route, kind: str, reference: str) -> None:
        """
        Refuse (DENIED) a pull the pull policy does not allow, before
        anything is looked up or fetched for it: ``kind`` is the route's
        (manifests, blobs, referrers, tags) and ``reference`` its tag or
        digest ("" for a tag list).
        """
        self.pulls.check(route, kind, reference)

    def fresh(self, route: Route, entry: TagEntry) -> bool:
        """
        A tag checked within its registry's revalidation window is served
        from cache with no upstream call at all.
        """
        return self.clock.seconds() - entry.checked < route.registry.tag_ttl

    def stale_allowed(self, route: Route, entry: Optional[TagEntry]) -> bool:
        """
        Whether a tag may be served from cache while its revalidation
        failed: always, unless --max-stale bounds its age.  The bound is
        strict, so that 0 serves nothing stale, even a tag checked this
        very instant.
        """
        if entry is None:
            return False
        if route.registry.max_stale is None:
            return True
        return self.clock.seconds() - entry.checked < route.registry.max_stale

    def failure(self, error: UpstreamError, what: str) -> RegistryError:
        """
        The client's error when upstream failed and nothing cached can
        stand in: what was asked for, then what upstream did, in the
        UpstreamError's own words (which name the upstream).
        """
        if error.rate_limited:
            return RegistryError(
                "TOOMANYREQUESTS", f"{what} is not cached and {error}",
                headers={"Retry-After": str(retry_after_seconds(error.retry_after))},
            )
        return RegistryError("UNAVAILABLE", f"{what} is not cached and {error}", status=503)
