"""
Errors as the OCI distribution spec shapes them: a status, a code from the
spec's list and a JSON body every client can parse.

Domain code raises RegistryError; the routes turn it into a response in one
place, so no handler formats an error body of its own.

What upstream did wrong reaches the client in words ("upstream
registry-1.docker.io refused the connection"), because the person reading a
failed ``docker pull`` needs what happened and where, not Twisted's
exception reprs.  ``transport_error`` is the one place that turns a
transport failure into those words; the exception itself goes to the log,
once, there.
"""

import json
from typing import Any, Dict, List, Optional

from OpenSSL.SSL import Error as TLSError
from service_identity.exceptions import VerificationError
from twisted.internet import error as neterror
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

#: The HTTP status each code is answered with.
STATUS = {
    "BLOB_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "MANIFEST_INVALID": 400,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "TAG_INVALID": 400,
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "UNAVAILABLE": 503,
}


class RegistryError(Exception):
    """
    A failure the client should see as an OCI error.  ``status`` defaults to
    the code's usual one; ``headers`` carry e.g. Retry-After or a challenge.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: Optional[int] = None,
        detail: Any = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS.get(code, 400)
        self.detail = detail
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        error: Dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode("utf-8")

    def __repr__(self) -> str:
        return f"RegistryError({self.code}, {self.status}, {self.message!r})"


class UpstreamError(Exception):
    """
    The upstream could not give an answer: a refused or timed-out connection,
    a DNS failure, a 5xx or a 429.  Policy decides whether a stale copy is
    served instead; ``status`` is None for transport failures.
    """

    def __init__(self, message: str, status: Optional[int] = None, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after

    @property
    def rate_limited(self) -> bool:
        return self.status == 429


class UpstreamTimeout(UpstreamError):
    """
    The upstream accepted the request and did not answer in time.
    """


class UpstreamUnreachable(UpstreamError):
    """
    No connection could be made: refused, no route, no DNS answer, or the
    connect timeout.  Like a timeout, one is enough to call the upstream
    sick (health.py).
    """


class UpstreamHeld(UpstreamError):
    """
    regcache did not contact the upstream at all: its circuit is open or a
    429 paused it (health.py).  Retrying at once cannot help, so nothing
    does.
    """


class UpstreamNotFound(Exception):
    """
    The upstream says the name, tag or digest does not exist (a 404, or
    Docker Hub's 401 insufficient_scope for a missing or private repo).
    """


class IntegrityError(Exception):
    """
    Bytes from upstream did not match their digest or announced length.
    """


_log = Logger(namespace="regcache.upstream")

#: How the connection ended when upstream (or the path to it) hung up.
_CLOSED = (neterror.ConnectionLost, neterror.ConnectionDone, neterror.ConnectionClosed, ConnectionError)


class RefusedDestination(neterror.ConnectError):
    """An address the upstream led to that regcache will not connect to."""

    def __init__(self, host: str, why: str):
        super().__init__(string=why)
        self.host = host
        self.why = why

    def __str__(self) -> str:
        return f"regcache will not connect to {self.host}: {self.why}"


#: Failures to connect at all, as opposed to a connection that went wrong.
_UNREACHABLE = (neterror.ConnectError, neterror.DNSLookupError)


def _causes(value: BaseException) -> List[BaseException]:
    """The exception and, for the HTTP client's wrappers, every reason inside."""
    found = [value]
    for reason in getattr(value, "reasons", None) or ():
        found.extend(_causes(reason.value if isinstance(reason, Failure) else reason))
    return found


def in_words(who: str, value: BaseException) -> str:
    """
    What a transport failure means for a person, naming ``who`` failed
    ("upstream registry-1.docker.io", "token server auth.docker.io").
    """
    causes = _causes(value)

    def any_of(*types) -> bool:
        return any(isinstance(c, types) for c in causes)

    refused = [c for c in causes if isinstance(c, RefusedDestination)]
    if refused:
        return f"{who} led to a place regcache will not connect to: {refused[0].why}"
    if any_of(neterror.ConnectionRefusedError):
        return f"{who} refused the connection"
    if any_of(neterror.DNSLookupError):
        return f"DNS lookup of {who} failed"
    if any_of(neterror.TimeoutError):
        return f"{who} could not be reached within the connect timeout (--connect-timeout)"
    unverified = any("certificate verify failed" in str(c) for c in causes if isinstance(c, TLSError))
    if unverified or any_of(VerificationError):
        return f"TLS certificate of {who} could not be verified"
    if any_of(TLSError):
        return f"TLS handshake with {who} failed"
    if isinstance(value, ResponseNeverReceived) and any_of(*_CLOSED):
        return f"{who} closed the connection before answering"
    if isinstance(value, ResponseFailed) and not any_of(*_CLOSED):
        return f"{who} sent a malformed HTTP response"
    if any_of(*_CLOSED):
        return f"{who} closed the connection mid-response"
    if any_of(neterror.ConnectError):
        return f"{who} could not be reached"
    return f"the exchange with {who} failed unexpectedly"


def transport_error(who: str, reason, during: str) -> UpstreamError:
    """
    An UpstreamError in words for a transport failure (a Failure or an
    exception) ``during`` some step, with the exception logged here.
    """
    value = reason.value if isinstance(reason, Failure) else reason
    message = in_words(who, value)
    detail = "; ".join(f"{type(c).__name__}: {c}" for c in _causes(value) if not getattr(c, "reasons", None))
    _log.warn("{message} while {during} ({detail})", message=message, during=during, detail=detail or repr(value))
    causes = _causes(value)
    # A place regcache refused to go says nothing of the upstream's health.
    if any(isinstance(c, _UNREACHABLE) for c in causes) and not any(isinstance(c, RefusedDestination) for c in causes):
        return UpstreamUnreachable(message)
    return UpstreamError(message)


class BlobTooLarge(Exception):
    """
    A blob larger than the cache's size limit: it can never be stored, and
    making room for it would evict everything.  Raised by the store before
    any room is made.
    """

    def __init__(self, digest, size: int, limit: int):
        super().__init__(f"blob {digest} of {size} bytes is larger than the cache limit of {limit} bytes")
        self.size = size
        self.limit = limit
