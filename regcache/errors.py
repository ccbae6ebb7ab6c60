"""
Errors as the OCI distribution spec shapes them: a status, a code from the
spec's list and a JSON body every client can parse.

Domain code raises RegistryError; the routes turn it into a response in one
place, so no handler formats an error body of its own.
"""

import json
from typing import Any, Dict, Optional

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


class UpstreamNotFound(Exception):
    """
    The upstream says the name, tag or digest does not exist (a 404, or
    Docker Hub's 401 insufficient_scope for a missing or private repo).
    """


class IntegrityError(Exception):
    """
    Bytes from upstream did not match their digest or announced length.
    """


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
