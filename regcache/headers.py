"""
Reading the few upstream response headers regcache acts on, tolerantly: a
missing or garbled header reads as None, never as an exception; and the
one header every upstream request carries, the ``User-Agent`` (Docker Hub's
front end has answered 403 to requests without one).
"""

from typing import Optional

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


def content_length(headers: Headers) -> Optional[int]:
    value = header(headers, b"content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def retry_after(headers: Headers) -> Optional[float]:
    value = header(headers, b"retry-after")
    if value and value.isdigit():
        return float(value)
    return None
