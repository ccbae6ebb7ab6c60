"""
Upstream authentication: the WWW-Authenticate challenge, and bearer tokens
fetched from the registry's token realm and cached per (scope, credential).

Docker Hub hands out tokens good for 300 s.  Fetching one per request would
double the upstream round trips (distribution's proxy does it for every tag
request), so a token is reused until shortly before it expires, and one fetch
is shared by every request that needs the same token at the same time.

That shared fetch is what every pull of the repository waits on, so it is
bounded like any upstream exchange (header timeout, then a capped body read
under the idle timer and body deadline): a token server that stalls fails
the fetch, stale copies stand in, and the next pull tries again.  Clients
choose the repository names, so the tokens held are bounded too.

A token request carries the upstream's credentials, and the realm it goes to
is named by whatever answered the registry's URL.  So a realm is asked only
when it lies on the registry's own registrable domain (``auth.docker.io``
for ``registry-1.docker.io``, by the Public Suffix List, so that
``evil.github.io`` is not ``github.io``'s), or is one of the realm hosts the
operator listed for that upstream: distribution's proxy sent its credentials
to any realm an upstream named (CVE-2026-33540).  A host with no registrable
domain (an IP literal, ``localhost``) must be the registry's own host, on
any port, as a token server beside the registry often is.
"""

import base64
import functools
import ipaddress
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple
from urllib.parse import urlencode

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from regcache.errors import UpstreamError
from regcache.headers import USER_AGENT, http_url
from regcache.singleflight import SingleFlight

_PARAM = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: Dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def error(self) -> Optional[str]:
        return self.params.get("error")


def parse_challenge(header: Optional[str]) -> Optional[Challenge]:
    """
    Parse ``Bearer realm="…",service="…",scope="…"`` (or ``Basic realm=…``).
    Returns None for a header that is absent or not a challenge.
    """
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    if not scheme or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", scheme):
        return None
    params: Dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> bytes:
        raw = f"{self.username}:{self.password}".encode("utf-8")
        return b"Basic " + base64.b64encode(raw)


@functools.lru_cache(maxsize=1)
def _suffixes():
    """The Public Suffix List, parsed once, on the first realm checked."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def registrable_domain(host: str) -> Optional[str]:
    """
    The domain a registrant controls (``docker.io`` for ``auth.docker.io``),
    or None for a host that has none: an IP literal, a single label, or a
    public suffix itself.
    """
    host = host.lower().rstrip(".")
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if "." not in host:
        return None
    return _suffixes().privatesuffix(host)


class Realms:
    """
    Which token realms one registry's credentials may be sent to: hosts on
    ``registry``'s registrable domain, ``registry`` itself on any port, and
    the ``extra`` realm hosts configured for it.
    """

    def __init__(self, registry: str, extra: Iterable[str] = ()):
        self.registry = registry.lower().rstrip(".")
        self.extra = frozenset(h.lower().rstrip(".") for h in extra)
        self._domain = registrable_domain(self.registry)

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if host == self.registry or host in self.extra:
            return True
        return self._domain is not None and registrable_domain(host) == self._domain


@dataclass
class _Token:
    value: str
    expires: float


#: Refresh this long before a token's stated expiry, so a request never
#: leaves with a token that expires on the way.
MARGIN = 15.0

#: Tokens held at most, least recently used dropped first: one per
#: repository pulled within a token's lifetime, and clients pick the names.
MAX_TOKENS = 1024

#: Docker Hub's tokens are a few KiB; GCR's and ECR's not much more.
MAX_TOKEN_BODY = 1024 * 1024

#: The lifetimes a token server may state, in seconds: a token that never
#: expires (``"nan"``, 1e300) would outlive revoked credentials, and one
#: under a second would cost a fetch per request.  The token spec's default
#: is 60 s.
LIFETIME_RANGE = (1.0, 3600.0)
DEFAULT_LIFETIME = 60.0

#: What may go into an Authorization header unchanged: visible ASCII.
_TOKEN = re.compile(r"[\x21-\x7e]+")


def _lifetime(stated) -> float:
    """A stated ``expires_in``, within LIFETIME_RANGE; the default when absent or NaN."""
    if not stated or isinstance(stated, bool):
        return DEFAULT_LIFETIME
    try:
        seconds = float(stated)
    except OverflowError:  # an integer past float's range
        seconds = math.inf
    if math.isnan(seconds):
        return DEFAULT_LIFETIME
    low, high = LIFETIME_RANGE
    return min(max(seconds, low), high)


class TokenCache:
    """
    Bearer tokens per (realm, service, scope, user), valid until shortly
    before they expire, at most ``capacity`` of them.  The token server is
    asked under the upstream's ``limits`` (exchange.py), and only if
    ``realms`` allows its host; ``who`` names the registry in errors.
    """

    log = Logger()

    def __init__(self, http, clock, credentials: Optional[Credentials], limits, who: str, realms: Realms,
                 capacity: int = MAX_TOKENS):
        self._http = http
        self._clock = clock
        self._credentials = credentials
        self._limits = limits
        self._who = who
        self._realms = realms
        self._capacity = capacity
        self._tokens: "OrderedDict[Tuple, _Token]" = OrderedDict()
        self._flights = SingleFlight()

    def __len__(self) -> int:
        return len(self._tokens)

    def _key(self, challenge: Challenge, scope: str) -> Tuple:
        user = self._credentials.username if self._credentials else None
        return (challenge.realm, challenge.params.get("service", ""), scope, user)

    def cached(self, challenge: Challenge, scope: str) -> Optional[str]:
        key = self._key(challenge, scope)
        token = self._tokens.get(key)
        if token is None:
            return None
        if token.expires <= self._clock.seconds():
            del self._tokens[key]
            return None
        self._tokens.move_to_end(key)
        return token.value

    def _keep(self, key: Tuple, token: _Token) -> None:
        """
        Hold a new token, dropping every expired one and then the least
        recently used past the limit.  Fetches are rare (one per scope per
        token lifetime), so the sweep costs little.
        """
        now = self._clock.seconds()
        for old in [k for k, t in self._tokens.items() if t.expires <= now]:
            del self._tokens[old]
        self._tokens[key] = token
        self._tokens.move_to_end(key)
        while len(self._tokens) > self._capacity:
            self._tokens.popitem(last=False)

    def invalidate(self, challenge: Challenge, scope: str) -> None:
        self._tokens.pop(self._key(challenge, scope), None)

    def replace_credentials(self, credentials: Optional[Credentials]) -> None:
        """
        Ask with ``credentials`` from now on, and forget every token the old
        ones earned: a password rotated because it leaked must stop working
        here too, not live on in a token for its remaining minutes.
        """
        self._credentials = credentials
        self._tokens.clear()

    async def authorization(self, challenge: Challenge, scope: str) -> bytes:
        """
        The Authorization header value for a request answered by this
        challenge: a (possibly cached) bearer token, or Basic credentials.
        """
        if challenge.scheme == "basic":
            if not self._credentials:
                raise UpstreamError(f"{self._who} wants Basic credentials and none are configured", 401)
            return self._credentials.basic()
        if challenge.scheme != "bearer" or not challenge.realm:
            raise UpstreamError(
                f"{self._who} asks for {challenge.scheme[:40]} authentication, which regcache does not support", 401
            )
        value = self.cached(challenge, scope)
        if value is None:
            value = await self._shared_fetch(challenge, scope)
        return b"Bearer " + value.encode("ascii")

    def _shared_fetch(self, challenge: Challenge, scope: str) -> Deferred:
        return self._flights.run(
            self._key(challenge, scope), lambda: Deferred.fromCoroutine(self._fetch(challenge, scope))
        )

    async def _fetch(self, challenge: Challenge, scope: str) -> str:
        realm = http_url(challenge.realm, "")
        if realm is None:
            self.log.warn("{registry} named an unusable token realm {realm}",
                          registry=self._who, realm=challenge.realm[:200])
            raise UpstreamError(f"{self._who} named an unusable token realm")
        if not self._realms.allows(realm.hostname):
            self.log.error(
                "{registry} named the token realm {realm}, which is neither on its own domain nor a realm "
                "configured for it: refused, and no credentials sent there",
                registry=self._who, realm=challenge.realm[:200],
            )
            raise UpstreamError(
                f"{self._who} named the token realm {realm.netloc[:100]}, which is not on its own domain "
                "nor a realm configured for it; regcache asks no token there", 403,
            )
        who = f"token server {realm.netloc}"
        query = []
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        if scope:
            query.append(("scope", scope))
        url = challenge.realm + ("&" if "?" in challenge.realm else "?") + urlencode(query)
        headers = {b"User-Agent": [USER_AGENT]}
        if self._credentials:
            headers[b"Authorization"] = [self._credentials.basic()]
        response = await self._limits.answer(
            lambda: self._http.get(url, headers=headers, unbuffered=True), who, f"fetching a token for {scope}"
        )
        if response.code != 200:
            await self._limits.discard(response, who)
            # Wrong credentials are an operator's problem: say so loudly,
            # but let policy keep serving what the cache holds.
            self.log.error(
                "Token realm {realm} answered {code} for scope {scope}",
                realm=challenge.realm, code=response.code, scope=scope,
            )
            raise UpstreamError(f"{who} answered {response.code}", response.code)
        body = await self._limits.read(response, MAX_TOKEN_BODY, who, "token")
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            expires_in = _lifetime(doc.get("expires_in"))
        except (ValueError, AttributeError, TypeError):
            raise UpstreamError(f"{who} sent no usable token") from None
        # It goes into a header as it is: visible ASCII only, checked before
        # it is cached, or every later request would fail on it.
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            raise UpstreamError(f"{who} sent no usable token")
        # Expiry counts from when the token arrived here, not issued_at, so a
        # skewed upstream clock cannot make regcache reuse a dead token.
        lifetime = max(expires_in - MARGIN, expires_in / 2)
        self._keep(self._key(challenge, scope), _Token(value, self._clock.seconds() + lifetime))
        return value
