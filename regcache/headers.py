"""
Reading the few upstream response headers regcache acts on, tolerantly: a
missing or garbled header reads as None, never as an exception; and the
one header every upstream request carries, the ``User-Agent`` (Docker Hub's
front end has answered 403 to requests without one).
"""

import math
from typing import Optional, Tuple
from urllib.parse import SplitResult, urljoin, urlsplit

from hyperlink import EncodedURL
from twisted.web.http_headers import Headers

from regcache import __version__

USER_AGENT = f"regcache/{__version__}".encode("ascii")


def media_type_of(headers: Headers) -> Optional[str]:
    values = headers.getRawHeaders(b"content-type")
    if not values:
        return None
    return values[0].decode("latin-1").split(";")[0].strip() or None


def header(headers: Headers, name: bytes) -> Optional[str]:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1").strip() if values else None


#: The pause a Retry-After may ask for, in seconds.  Below a second is a
#: busy loop; past six hours (Docker Hub's rate window) a glitch or a hostile
#: upstream would stop manifest requests for good.
RETRY_AFTER_RANGE = (1.0, 6 * 3600.0)

#: More digits than any length or pause regcache acts on could need; also
#: keeps int() clear of its 4,300-digit refusal.
_MAX_DIGITS = 30


def decimal(value: Optional[str]) -> Optional[int]:
    """
    A header number: ASCII digits only, else None.  ``str.isdigit`` and
    ``int`` alone also take "²", "١٢" or "1_0", which are no HTTP number.
    """
    if not value or len(value) > _MAX_DIGITS or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def content_length(headers: Headers) -> Optional[int]:
    return decimal(header(headers, b"content-length"))


def retry_after(headers: Headers) -> Optional[float]:
    """Seconds to wait, clamped to RETRY_AFTER_RANGE; None if absent or unreadable (HTTP dates included)."""
    seconds = decimal(header(headers, b"retry-after"))
    if seconds is None:
        return None
    low, high = RETRY_AFTER_RANGE
    return min(max(float(seconds), low), high)


def ratelimit(headers: Headers, name: bytes) -> Tuple[Optional[int], Optional[int]]:
    """
    A rate-limit header, ``100;w=21600``, as (count, window seconds); None
    for what is absent or does not read, each part on its own.
    """
    value = header(headers, name)
    if not value:
        return None, None
    count, _, rest = value.partition(";")
    key, _, window = rest.partition("=")
    return decimal(count.strip()), decimal(window.strip()) if key.strip().lower() == "w" else None


def retry_after_seconds(wait: Optional[float], default: float = 60.0) -> int:
    """
    The Retry-After regcache sends its own clients: whole seconds within
    RETRY_AFTER_RANGE, whatever ``wait`` is (None, NaN or infinite reads as
    ``default``), so no value from upstream can fail the answer.
    """
    if wait is None or not math.isfinite(wait):
        wait = default
    low, high = RETRY_AFTER_RANGE
    return int(math.ceil(min(max(wait, low), high)))


def http_url(base: str, reference: str) -> Optional[SplitResult]:
    """
    The split absolute http(s) URL that ``reference`` (a Location, a token
    realm) names relative to ``base``, or None if it names none.  urljoin
    and urlsplit raise ValueError for a bad IPv6 literal, ``port`` for a
    port out of range, and treq for a host it cannot encode: upstream's
    words, checked here once.
    """
    try:
        parts = urlsplit(urljoin(base, reference))
        parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        # What treq does to a URL before it sends a request: it refuses (with
        # an exception, not a failed Deferred) hosts that IDNA will not
        # encode, IPv6 literals among them.
        EncodedURL.from_text(parts.geturl()).to_uri().to_text().encode("ascii")
    except (ValueError, UnicodeError):
        return None
    return parts
