# test-case-name: tests.test_redirect,tests.integration.test_redirect_proc
"""
Redirects to the bucket (``--s3-redirect``): a blob GET whose blob the
bucket holds is answered with a 307 to a presigned GET URL of it, so the
bytes go from the object store to the client and never through a replica,
as distribution does on S3 and GCS.

It is decided after everything a served blob must pass (the pull policy,
client authentication, the repository's link to the digest: regcache.mirror),
and only then is the bucket asked, with one HEAD under the shared level's
deadline.  Whatever that cannot settle is served as without redirects:

- a fill of the blob under way here: the client follows it (the bucket
  has no copy yet);
- the bucket lacks a blob the local store holds: served from the local
  level, and uploaded in the background (the bucket lost it to eviction,
  or its first upload failed), once per SHARE_AGAIN, so that later GETs
  are redirected;
- neither holds it: the usual fill, which uploads it once it landed;
- the bucket failed or was late: served as if it held nothing.

A Range request is redirected too: clients send their Range again to the
Location, and a presigned GET honours it.  A HEAD is always answered here:
a URL presigned for GET refuses HEAD.  What the bucket sends is what
regcache verified before it uploaded it; clients check digests themselves.

A client's Authorization header must never reach the bucket: Go's HTTP
client (containerd, dockerd, skopeo, podman) keeps it on a redirect to the
same host name or a subdomain of it (some Go versions compare the port
too, some do not: the check here is by name, the safe side); S3 then
refuses the request (two kinds of authentication; moby#50065), and the
store has seen the client's password.  So a request that carries one, to
a host whose name is the bucket's or a parent domain of it, is served
here instead.
"""

from collections import OrderedDict
from typing import Optional
from urllib.parse import urlsplit

from twisted.logger import Logger

from regcache.reference import Digest
from regcache.s3 import StorageError
from regcache.shared import SharedLevel, blob_name

#: Seconds before a blob held here that the bucket still lacks is uploaded again.
SHARE_AGAIN = 600.0
#: Blobs remembered as uploaded that way.
MAX_SHARED = 1024


def keeps_authorization(target: str, origin: str) -> bool:
    """
    Whether Go's HTTP client keeps the Authorization header on a redirect
    from host ``origin`` to host ``target``: the same name or a subdomain
    (net/http's isDomainOrSubdomain), whatever the ports.
    """
    target, origin = target.lower().rstrip("."), origin.lower().rstrip(".")
    if target == origin:
        return True
    if ":" in target or "%" in target:
        return False  # an IPv6 address is nobody's subdomain
    return target.endswith("." + origin)


def host_name(field: str) -> str:
    """The name in a Host field (already checked to be one: regcache.site), without its port."""
    if field.startswith("["):
        return field[1:field.find("]")]
    name, colon, port = field.rpartition(":")
    return name if colon and port.isdigit() else field


class Redirects:
    """
    Presigned URLs of the bucket's blobs, valid ``expiry`` seconds, for the
    GETs that may be sent there.
    """

    log = Logger()

    def __init__(self, shared: SharedLevel, expiry: float, metrics, reactor):
        self.shared = shared
        self.reactor = reactor
        #: Blobs this replica uploaded because a redirect found the bucket lacking them, and when.
        self._shared: "OrderedDict[Digest, float]" = OrderedDict()
        self.expiry = int(expiry)
        self.metrics = metrics
        #: Where presigned URLs point: the endpoint's host.
        self.host = urlsplit(shared.bucket.settings.endpoint).hostname or ""
        self._warned = False

    def _may_share(self, digest: Digest) -> bool:
        """
        Whether to upload a blob the bucket lacks: not again within
        SHARE_AGAIN seconds, so the GETs that come while it goes up do not
        upload it again; the table is bounded, the oldest forgotten first.
        """
        now = self.reactor.seconds()
        last = self._shared.get(digest)
        if last is not None and now - last < SHARE_AGAIN:
            return False
        self._shared[digest] = now
        self._shared.move_to_end(digest)
        while len(self._shared) > MAX_SHARED:
            self._shared.popitem(last=False)
        return True

    def allowed(self, host: str, authorization: bool) -> bool:
        """
        Whether a GET sent to ``host`` (its Host field: the client's name
        for regcache) may be redirected: not when it carries an
        Authorization header that the redirect would take to the bucket.
        """
        host = host_name(host)
        if not authorization or not keeps_authorization(self.host, host):
            return True
        if not self._warned:
            self._warned = True
            self.log.warn(
                "Not redirecting blob GETs sent to {host} with credentials: the bucket's host {bucket} is that "
                "name or a subdomain of it, so clients would send their Authorization header there too; serving "
                "them here (give the bucket a host name of its own)", host=host, bucket=self.host)
        return False

    async def location(self, digest: Digest, held: Optional[int]) -> Optional[str]:
        """
        The presigned URL of the bucket's copy of ``digest``, or None to
        serve it here; ``held`` is the size of the local copy, if any,
        which goes up to the bucket if the bucket lacks it.
        """
        lookups = self.metrics.shared_lookups
        try:
            info = await self.shared.blob_info(digest)
        except StorageError as e:
            lookups.labels("blob_redirect", "failed").inc()
            self.log.warn("The bucket cannot be asked about {digest}: {error}; serving it without a redirect",
                          digest=str(digest), error=str(e))
            return None
        if info is None:
            lookups.labels("blob_redirect", "miss").inc()
            if held is not None and self._may_share(digest):
                self.shared.share(digest, held)
            return None
        lookups.labels("blob_redirect", "hit").inc()
        return self.shared.bucket.presign(blob_name(digest), self.expiry)
