# -*- test-case-name: tests.test_chain -*-
"""
One upstream served by several registries tried in order: ``mirror.gcr.io``
first, then ``registry-1.docker.io``, as the seed's CI sets its daemons up
by hand.

A Chain is a regcache.remote.Remote, so the mirror, the fills and the
single-flight above them do not know one is there: concurrent clients still
cause one request, which the chain sends to each member in turn until one
answers.  A member that lacks the content (404, Docker Hub's
insufficient_scope), refuses us (401, 403), is rate limiting (429, or paused
by an earlier one), fails (5xx), cannot be reached, does not answer in time
or has its circuit open (which, like a pause, costs no request) is passed
over for the next one; the first that answers decides, for a tag's HEAD as
for everything else.

Each member is a whole upstream.Upstream: its own credentials, token cache,
token realms, health (circuit and 429 pauses), timeouts and metrics labels, so nothing one member
is given ever reaches another.  What a member sends is checked by that
member as it would be alone (a manifest against its digest; a blob by the
fill, whichever member it came from), and a blob's stream resumes at the
member that sent it (remote.py).

Building one::

    Chain([Upstream("https://mirror.gcr.io", http, clock, metrics, key="docker.io", docker_hub=True),
           Upstream("https://registry-1.docker.io", http, clock, metrics, credentials, key="docker.io")],
          clock)

Give every member the upstream's name as ``key``, so that their metrics say
which upstream they serve; the chain's own ``key`` (its tags) is that of its
last member, the origin the others stand in front of, unless given.  Names
are the last member's too (``library/`` for Docker Hub): every member is
asked for the repository by the origin's name.
"""

from typing import Awaitable, Callable, List, Optional, Sequence, TypeVar

from twisted.logger import Logger

from regcache.errors import UpstreamError, UpstreamNotFound
from regcache.manifests import Manifest
from regcache.reference import Digest
from regcache.remote import BlobStream, ManifestInfo, MemberHealth, Referrers, Remote, TagList

T = TypeVar("T")


class Chain:
    """Registries tried in order, as one Remote."""

    log = Logger()

    def __init__(self, members: Sequence[Remote], clock, key: Optional[str] = None):
        if not members:
            raise ValueError("a chain needs at least one member")
        self.members = list(members)
        self.clock = clock
        self.key = key or self.members[-1].key

    def __repr__(self) -> str:
        return f"<Chain {self.key}: {self.members!r}>"

    def repository(self, name: str) -> str:
        return self.members[-1].repository(name)

    def health(self) -> List[MemberHealth]:
        return [h for m in self.members for h in m.health()]

    def head_manifest(self, name: str, reference: str, accept: Sequence[str],
                      retry: bool = False) -> Awaitable[Optional[ManifestInfo]]:
        return self._first(f"{name}:{reference}", lambda m: m.head_manifest(name, reference, accept, retry))

    def get_manifest(self, name: str, reference: str, accept: Sequence[str], expect: Optional[Digest] = None,
                     retry: bool = False) -> Awaitable[Manifest]:
        return self._first(f"{name}:{reference}",
                           lambda m: m.get_manifest(name, reference, accept, expect, retry))

    def open_blob(self, name: str, digest: Digest) -> Awaitable[BlobStream]:
        return self._first(f"blob {digest}", lambda m: m.open_blob(name, digest))

    def head_blob(self, name: str, digest: Digest) -> Awaitable[int]:
        return self._first(f"blob {digest}", lambda m: m.head_blob(name, digest))

    def referrers(self, name: str, digest: Digest, artifact_type: Optional[str] = None,
                  retry: bool = False) -> Awaitable[Referrers]:
        # A member without the API answers 404, a miss: the next may have it,
        # and when none does the 404 sends clients to the tag schema.
        return self._first(f"the referrers of {name}@{digest}",
                           lambda m: m.referrers(name, digest, artifact_type, retry))

    async def tags_list(self, name: str, query: bytes) -> TagList:
        """
        A member whose tag list answer is a refusal (a 401 or 403 passed
        through) is passed over like one that raised; if every member
        refuses, the first refusal is what the client sees.
        """
        refusals: List[TagList] = []

        async def ask(member: Remote) -> TagList:
            answer = await member.tags_list(name, query)
            if answer.status >= 400:
                refusals.append(answer)
                raise UpstreamError(f"{_who(member)} answered {answer.status} for the tag list", answer.status)
            return answer

        try:
            return await self._first(f"{name} tags", ask)
        except UpstreamError:
            if refusals:
                return refusals[0]
            raise

    async def _first(self, what: str, call: Callable[[Remote], Awaitable[T]]) -> T:
        """
        ``call`` on each member in turn until one answers.  A member whose
        circuit is open or that a 429 paused raises at once (health.py), so
        it is skipped without being contacted.  When none does,
        the content is missing (UpstreamNotFound) only if every member said
        so; otherwise some member may have it, and it fails as an outage
        (UpstreamError, so a stale copy may stand in), in words naming what
        each member did, rate limited only if every failing member was.
        """
        errors: List[UpstreamError] = []
        missing: Optional[UpstreamNotFound] = None
        for member in self.members:
            started = self.clock.seconds()
            try:
                return await call(member)
            except UpstreamNotFound as e:
                missing = missing or e
                reason = "does not have it"
            except UpstreamError as e:
                errors.append(e)
                reason = str(e)
            self.log.info("{upstream}: {member} failed {what} after {took:.3f}s ({reason}); trying the next member",
                          upstream=self.key, member=_who(member), what=what, reason=reason,
                          took=self.clock.seconds() - started)
        if not errors:
            raise missing or UpstreamNotFound(what)
        words = "; ".join(str(e) for e in errors)
        if missing is not None:
            words += f"; and {len(self.members) - len(errors)} other member(s) of {self.key} do not have it"
        if all(e.rate_limited for e in errors):
            waits = [e.retry_after for e in errors if e.retry_after is not None]
            raise UpstreamError(words, 429, retry_after=min(waits) if waits else None)
        raise UpstreamError(words, errors[-1].status)


def _who(member: Remote) -> str:
    return getattr(member, "who", member.key)
