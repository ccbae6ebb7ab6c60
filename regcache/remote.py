# -*- test-case-name: tests.test_remote -*-
"""
What the cache asks of an upstream, as one interface.

Mirror, the fills and the policy hold an upstream only as a ``Remote``, the
way distribution's proxy puts its local, remote and proxy stores behind one
interface: the single-registry client (upstream.Upstream) is one, and a
chain of several, tried in order, must be able to be one too.  Nothing here
speaks HTTP: what a response's status line and headers said is read in
upstream.py, and reaches the cache as values.

A chain can implement ``Remote`` without its callers knowing, because a
blob download is resumed through the stream, not the Remote: a
``BlobStream`` resumes at the upstream that sent it, so a chain hands back
its member's stream and a resume after a broken connection goes to that same
member, never to another whose copy may differ in size or fail differently.
The stream also names that member (``source``) and its idle timeout, for
the fill's metrics, words and stall timer.
"""

from dataclasses import dataclass
from typing import Awaitable, List, Optional, Protocol, Sequence, runtime_checkable

from twisted.internet.interfaces import IProtocol

from regcache.reference import Digest
from regcache.manifests import Manifest


@dataclass(frozen=True)
class ManifestInfo:
    """What a manifest HEAD told: the digest, and what upstream said of its type and size."""

    digest: Digest
    media_type: str
    size: Optional[int]


@dataclass(frozen=True)
class TagList:
    """A tag list as upstream answered it, with its pagination links (``Link`` values) as sent."""

    status: int
    link: Optional[List[bytes]]
    body: bytes


#: The most of a referrers index read: it lists signatures, SBOMs and
#: attestations, a few KiB even for an image signed many times over.
MAX_REFERRERS = 4 * 1024 * 1024


@dataclass(frozen=True)
class Referrers:
    """
    A referrers index as upstream answered it (an image index of at most
    MAX_REFERRERS bytes), and whether upstream applied the artifactType filter
    (``OCI-Filters-Applied``).
    """

    body: bytes
    filtered: bool


@dataclass(frozen=True)
class MemberHealth:
    """
    How one registry of an upstream is doing, as the status page and
    metrics show it.  ``state`` is one of "up", "failing" (errors, circuit
    still closed), "open" (circuit open: not contacted until ``until``, then
    probed), "rate limited" (a 429 pause until ``until``); ``detail`` says
    why in words.
    """

    member: str
    state: str
    detail: str = ""
    since: Optional[float] = None
    until: Optional[float] = None


@runtime_checkable
class BlobStream(Protocol):
    """
    One upstream answer with (part of) a blob, its body not yet read.

    It delivers the blob's bytes from ``start`` on: ``start`` is the offset
    the resume asked for, or 0 when upstream sent the whole blob again, and
    is never anywhere else (an upstream that answers another range is
    refused before a stream exists).
    """

    #: The size of the whole blob, or None when upstream did not say.
    total: Optional[int]
    #: The offset of the first byte ``deliver`` gives.
    start: int
    #: The upstream sending, as metrics and error messages name it.
    source: str
    #: Seconds the body may stall before the connection is given up.
    idle: float

    def deliver(self, protocol: IProtocol) -> None:
        """
        Stream the body into ``protocol`` as ``IResponse.deliverBody``
        does: a pausable transport, ``dataReceived`` per chunk, and
        ``connectionLost`` with ResponseDone or PotentialDataLoss at a
        clean end.  Call it, or ``abandon``, once.
        """

    def abandon(self) -> None:
        """Give the body up unread, with its connection."""

    def resume(self, offset: int) -> Awaitable["BlobStream"]:
        """The same blob from ``offset``, asked of the upstream that sent this stream."""


@runtime_checkable
class Remote(Protocol):
    """
    An upstream as the cache uses it.  Every method raises UpstreamError
    (UpstreamNotFound for what upstream does not have), its message naming
    the upstream in words.
    """

    #: The name the cache files this upstream's tags under.
    key: str

    def repository(self, name: str) -> str:
        """The upstream's own name for the repository a client called ``name``."""

    def head_manifest(
        self, name: str, reference: str, accept: Sequence[str], retry: bool = False
    ) -> Awaitable[Optional[ManifestInfo]]:
        """Resolve a reference without a counted pull; None when upstream named no digest."""

    def get_manifest(
        self, name: str, reference: str, accept: Sequence[str], expect: Optional[Digest] = None, retry: bool = False
    ) -> Awaitable[Manifest]:
        """The manifest's bytes, checked against ``expect`` or the digest upstream announced."""

    def open_blob(self, name: str, digest: Digest) -> Awaitable[BlobStream]:
        """The whole blob, as a stream whose body is not yet read."""

    def head_blob(self, name: str, digest: Digest) -> Awaitable[int]:
        """The blob's size, without downloading it."""

    def tags_list(self, name: str, query: bytes) -> Awaitable[TagList]:
        """A tag list, ``query`` (pagination) passed on as given."""

    def health(self) -> List[MemberHealth]:
        """How each registry behind this upstream is doing, in chain order."""

    def referrers(
        self, name: str, digest: Digest, artifact_type: Optional[str] = None, retry: bool = False
    ) -> Awaitable[Referrers]:
        """
        The OCI 1.1 referrers index of ``digest``, checked to be an image
        index, filtered by ``artifact_type`` if upstream does so;
        UpstreamNotFound when upstream has no referrers API (it answers 404).
        """
