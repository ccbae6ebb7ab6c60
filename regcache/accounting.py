"""
Pull accounting: how many counted pulls (manifest GETs) each upstream
credential has spent, and what the upstream last said is left.

Docker Hub counts pulls per account (or per address, anonymously) over a
window it names in its ``ratelimit-*`` headers; this module keeps the
same counts on regcache's side, so "how many pulls did we use" has an
answer even when those headers are absent.
"""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass(frozen=True)
class Usage:
    """
    One credential's use of one upstream member, as the status page and
    ``/status.json`` show it.  ``credential`` is the account name, or
    "anonymous"; ``hourly_pulls`` holds the last 24 hours' counted pulls,
    oldest first, the current hour last.  ``limit``, ``remaining``,
    ``window`` (seconds) and ``source`` are the upstream's last
    ``ratelimit-*`` headers, seen at ``seen``; None where it sent none.
    """

    upstream: str
    member: str
    credential: str
    pulls_6h: int = 0
    pulls_24h: int = 0
    heads_6h: int = 0
    blob_bytes_24h: int = 0
    hourly_pulls: List[int] = field(default_factory=lambda: [0] * 24)
    limit: Optional[int] = None
    remaining: Optional[int] = None
    window: Optional[int] = None
    source: Optional[str] = None
    seen: Optional[float] = None
