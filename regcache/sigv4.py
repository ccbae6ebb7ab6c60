# test-case-name: tests.test_s3
"""
AWS Signature Version 4 for the shared level's bucket (regcache.s3), by
botocore.  A module of its own so that botocore, a tenth of regcache's
import time, is imported only by a process that has a bucket
configured: the others reach /readyz sooner.
"""

from typing import Dict

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class _Signer(S3SigV4Auth):
    """SigV4 with the payload hash given, not computed: a streamed body's own sha256."""

    def __init__(self, credentials, region: str, payload: str):
        super().__init__(credentials, "s3", region)
        self._payload = payload

    def payload(self, request):
        return self._payload


def credentials(access_key: str, secret_key: str) -> Credentials:
    return Credentials(access_key, secret_key)


def presign(creds: Credentials, region: str, url: str, expires: int) -> str:
    """A GET URL that works without credentials for ``expires`` seconds."""
    request = AWSRequest(method="GET", url=url)
    S3SigV4QueryAuth(creds, "s3", region, expires=expires).add_auth(request)
    return request.url


def sign(creds: Credentials, region: str, method: str, url: str, headers: Dict[str, str],
         payload: str) -> Dict[str, str]:
    """The headers of a signed request whose body hashes to ``payload``."""
    request = AWSRequest(method=method, url=url, headers=dict(headers))
    _Signer(creds, region, payload).add_auth(request)
    return dict(request.headers.items())
