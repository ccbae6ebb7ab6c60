"""
Who is pulling: the one value client authentication hands to the pull
policy and the mirror, so neither reads requests or credentials itself.

Authentication (regcache.clientauth) decides it once per request; the pull
policy's rules match its user and groups; the mirror asks it whether this
client may make regcache contact an upstream (``anonymous: cached-only``).
"""

from dataclasses import dataclass
from typing import FrozenSet, Optional


@dataclass(frozen=True)
class Identity:
    """
    ``user`` is the authenticated user name, None for a client that sent no
    valid credentials; ``trusted`` says it came from a trusted network;
    ``address`` is the client address regcache believes (the direct peer, or
    X-Forwarded-For from a trusted proxy), for logs and rate limits only.
    ``may_fetch`` is False when a miss must not reach upstream for this
    client: the cache serves it what it holds, nothing more.
    """

    user: Optional[str] = None
    groups: FrozenSet[str] = frozenset()
    trusted: bool = False
    address: Optional[str] = None
    may_fetch: bool = True

    @property
    def anonymous(self) -> bool:
        return self.user is None


#: The client when client authentication is off: anyone, allowed to fetch.
EVERYONE = Identity()
