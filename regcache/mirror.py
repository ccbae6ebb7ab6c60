"""
The pull-through logic: what to answer from the cache, what to ask upstream,
and what to do when upstream fails.

Digests are local-first: content never changes, so a cached digest is served
with no upstream call, outage or not, under the repositories known to hold
it (regcache.links).  Under any other name it is served only once upstream
confirmed, with a HEAD in that repository's scope, that the repository
holds it: content is stored once, but a layer fetched for ``myorg/secret``
must not be readable as ``library/alpine``.  Tags are policy-first: fresh within
the revalidation window, then checked with a HEAD (free on Docker Hub), and
served stale when that check fails; referrers indexes, which change as
images are signed, are kept the same way.  A manifest GET upstream, the request
Docker Hub counts as a pull, happens only for a digest regcache does not
hold.
"""

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from regcache.body import Source
from regcache.errors import BlobTooLarge, IntegrityError, RegistryError, UpstreamError, UpstreamNotFound
from regcache.links import RepoKey
from regcache.manifests import MANIFEST_MEDIA_TYPES, MAX_MANIFEST, Manifest, declared_type
from regcache.policy import Route
from regcache.reference import Digest, check_tag, is_digest
from regcache.referrers import ReferrersEntry, ReferrersKey
from regcache.remote import ManifestInfo
from regcache.shared import BUCKET
from regcache.singleflight import SingleFlight
from regcache.tags import TagEntry, TagKey, accept_key, accepted

STALE_WARNING = '110 regcache "Response is Stale"'

#: Link confirmations under way at once (distinct repository and digest
#: pairs, a table keyed by what clients ask for); past it, a 503.
MAX_CONFIRMATIONS = 256

#: Distinct objects looked for in the shared bucket at once with their
#: callers waiting together; past it, each caller looks on its own.
MAX_BUCKET_LOOKS = 1024

#: A media type (RFC 6838's restricted names), as an artifactType filter
#: must be before it goes upstream and into a cache key.
#: Repositories remembered as having no referrers API upstream (a 404),
#: the least recently told forgotten first: a bound on what requests
#: for many names can make the mirror hold.
MAX_NO_REFERRERS = 4096

_MEDIA_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


@dataclass
class ManifestAnswer:
    digest: Digest
    media_type: str
    size: int
    body: Optional[bytes]
    cache: str
    warning: Optional[str] = None


@dataclass
class ReferrersAnswer:
    body: bytes
    #: Whether upstream applied the artifactType filter.
    filtered: bool
    cache: str
    warning: Optional[str] = None


class BlobAnswer:
    """
    A blob opened for one client.  It owns the descriptor and the pin that
    keeps the blob from eviction, and gives both up in ``release``, once,
    whoever calls it first: the route always does when the response ends,
    however it ends, and a sender may sooner.  No other code closes ``fd``.
    """

    def __init__(self, size: int, fd: int, source, cache: str, unpin: Callable[[], None]):
        self.size = size
        self.fd = fd
        self.source = source
        self.cache = cache
        self._unpin: Optional[Callable[[], None]] = unpin

    def release(self) -> None:
        if self._unpin is None:
            return
        unpin, self._unpin = self._unpin, None
        try:
            os.close(self.fd)
        finally:
            unpin()


class Mirror:
    log = Logger()

    def __init__(self, store, tags, fills, policy, metrics, clock, referrers, meta=None, redirects=None, uses=None):
        """
        ``meta`` is the shared level's manifests, tags and links
        (regcache.sharedmeta), when there is a bucket: where a local miss
        looks before upstream, and where what is fetched is shared.
        ``redirects`` (regcache.redirect): where blob GETs may be sent to
        the bucket; None: nowhere.  ``uses`` (regcache.sweeper.Uses)
        records the blobs served, for the bucket's eviction; None: no limit.
        """
        self.store = store
        self.meta = meta
        self.redirects = redirects
        self.uses = uses
        self.tags = tags
        self.referrers_cache = referrers
        self.fills = fills
        self.policy = policy
        self.metrics = metrics
        self.clock = clock
        self._tag_checks = SingleFlight()
        self._manifest_gets = SingleFlight()
        #: Looks into the shared bucket, one per object at a time
        #: (manifests, tags, links), each ended by the shared level's deadline.
        self._bucket_looks = SingleFlight()
        self._referrers_gets = SingleFlight()
        #: (upstream, repository) -> clock seconds of upstream's last 404
        #: to a referrers request there (see ``referrers``).
        self._no_referrers: "OrderedDict[RepoKey, float]" = OrderedDict()
        self._confirmations = SingleFlight()

    # Manifests

    async def manifest(self, route: Route, reference: str, accept: List[str], want_body: bool) -> ManifestAnswer:
        if is_digest(reference):
            m, cache = await self._by_digest(route, Digest.parse(reference))
            return ManifestAnswer(m.digest, m.media_type, m.size, m.body, cache)
        return await self._by_tag(route, check_tag(reference), accepted(accept), want_body)

    async def _by_digest(self, route: Route, digest: Digest, vouched: bool = False):
        """
        ``vouched``: the repository's own tag named ``digest``, so it holds
        it with no need to ask.
        """
        m, cache = await self._held(digest), "hit"
        if m is None:
            m, cache = await self._from_bucket(digest), "shared"
        if m is not None:
            if not vouched:
                await self._confirmed(route, digest, "manifest")
            self.metrics.cache.labels("manifest", cache).inc()
            return m, cache
        self.metrics.cache.labels("manifest", "miss").inc()
        _may_fetch(route, f"manifest {route.name}@{digest}")
        # Content is pinned by the digest, so ask with every type: an Accept
        # that leaves one out only risks a needless 404.  One GET per
        # repository: another's answer says nothing of this one.
        m = await self._manifest_gets.run(
            (_repository(route), digest), lambda: Deferred.fromCoroutine(self._fetch_manifest(route, digest))
        )
        return m, "miss"

    async def _fetch_manifest(self, route: Route, digest: Digest) -> Manifest:
        try:
            m = _typed(await route.upstream.get_manifest(
                route.name, str(digest), list(MANIFEST_MEDIA_TYPES), digest, retry=True
            ))
        except UpstreamNotFound:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.name}@{digest}")
        except UpstreamError as e:
            raise self.policy.failure(e, f"manifest {digest}")
        await self._keep(m, _repository(route))
        return m

    async def _keep(self, m: Manifest, link: Optional[RepoKey] = None) -> None:
        """Store a manifest fetched from upstream (checked against its digest), and share it."""
        await self.store.put_manifest(m, link)
        if self.meta is not None:
            self.meta.put_manifest(m)

    async def _from_bucket(self, digest: Digest) -> Optional[Manifest]:
        """
        The shared bucket's copy of the manifest ``digest``, stored here
        once it proved to be that manifest; None without a bucket, or when
        it has none (or cannot say in time).
        """
        if self.meta is None:
            return None
        return await self._look(("manifest", digest), lambda: self._load(digest))

    def _look(self, key, work) -> Deferred:
        """
        ``work()`` (a look into the bucket), shared with the callers waiting
        for the same ``key``; past MAX_BUCKET_LOOKS keys under way (clients
        choose them), each caller looks alone.
        """
        if key not in self._bucket_looks and len(self._bucket_looks) >= MAX_BUCKET_LOOKS:
            return Deferred.fromCoroutine(work())
        return self._bucket_looks.run(key, lambda: Deferred.fromCoroutine(work()))

    async def _load(self, digest: Digest) -> Optional[Manifest]:
        m = await self.meta.manifest(digest)
        if m is not None:
            await self.store.put_manifest(m)
        return m

    async def _held(self, digest: Digest) -> Optional[Manifest]:
        """
        The manifest ``digest`` if the store holds it; never asks upstream.
        One the disk cannot read now (no descriptor left, an I/O error) is
        still held: a 503, never a miss or a 500.
        """
        try:
            return await self.store.manifest(digest)
        except OSError as e:
            self.metrics.cache.labels("manifest", "unreadable").inc()
            raise RegistryError("UNAVAILABLE", f"the cache cannot read manifest {digest} now: {e.strerror}",
                                status=503)

    def _holds(self, digest: Digest) -> bool:
        """Whether the store holds the manifest ``digest``, for decisions made before reading it."""
        return self.store.has_manifest(digest)

    async def _by_tag(self, route: Route, tag: str, types: Tuple[str, ...], want_body: bool) -> ManifestAnswer:
        """
        ``types`` are the manifest media types the client accepts.  The
        answer's size and type are the manifest's own whenever regcache
        holds it; only a HEAD of a tag never fetched relays upstream's
        HEAD, and only what passed ``_described``.
        """
        if not types:
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"manifest unknown: {route.name}:{tag}: the Accept header names none of the manifest media "
                f"types regcache serves ({', '.join(MANIFEST_MEDIA_TYPES)})",
            )
        key = TagKey(route.registry.name, route.name, tag, accept_key(types))
        entry = known = await self.tags.get(key)
        if known is None and self.meta is not None:
            entry = known = await self._look(("tag", key), lambda: self._bucket_tag(key))
        warning = None
        # Whether ``entry`` is this key's own, not another kind of client's.
        own = True
        if entry is not None and self.policy.fresh(route, entry):
            cache = "hit"
        elif not route.client.may_fetch:
            entry, cache, warning, own = await self._unchecked(route, key, known, types, want_body)
        else:
            # With a copy to fall back on, fail fast: a stale answer now beats
            # a fresh one after retries.  Without one, retrying is all there is.
            fallback = await self._stand_in(route, key, known, types, want_body)
            retry = fallback is None
            try:
                check = self._tag_checks.run(
                    key, lambda: Deferred.fromCoroutine(self._check_tag(route, tag, types, key, known, retry))
                )
                if fallback is not None:
                    check = self._within_deadline(check, route)
                entry = await check
                cache = "revalidated" if known is not None and known.digest == entry.digest else "miss"
            except UpstreamNotFound:
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.name}:{tag}")
            except UpstreamError as e:
                if fallback is None:
                    raise self.policy.failure(e, f"{route.name}:{tag}")
                self.log.warn(
                    "Serving {name}:{tag} from cache ({digest}, checked {age:.0f}s ago): upstream failed: {error}",
                    name=route.name, tag=tag, digest=fallback.digest,
                    age=self.clock.seconds() - fallback.checked, error=str(e),
                )
                entry, cache, warning = fallback, "stale", STALE_WARNING
                own = fallback is known
        self.metrics.cache.labels("tag", cache).inc()
        digest = entry.parsed_digest
        media_type, size, body = entry.media_type, entry.size, None
        if want_body or size < 0:
            m, _ = await self._by_digest(route, digest, vouched=True)
        else:
            m = await self._held(digest) if self._holds(digest) else None
        if m is not None:
            # Upstream named it for this repository's tag.
            self.store.link(digest, _repository(route))
            media_type, size, body = m.media_type, m.size, m.body if want_body else None
            if own and (entry.media_type, entry.size) != (media_type, size):
                # The manifest corrects what upstream's HEAD said about it.
                self.tags.put(key, replace(entry, media_type=media_type, size=size))
        if media_type not in types:
            raise RegistryError(
                "MANIFEST_UNKNOWN",
                f"manifest unknown: {route.name}:{tag} is a {media_type} manifest, "
                "which the Accept header does not include",
            )
        return ManifestAnswer(digest, media_type, size, body, cache, warning)

    async def _bucket_tag(self, key: TagKey) -> Optional[TagEntry]:
        """
        The shared bucket's entry for a tag this replica has none of, kept
        here as if checked here when the bucket's was (unless a newer one
        landed meanwhile), with its manifest: a replica that never saw the
        tag serves it fresh with no upstream request, and stale, as the
        bucket last knew it, while upstream fails.
        """
        found = await self.meta.tag(key)
        if found is None:
            return None
        entry = self.tags.adopt(key, found)
        digest = entry.parsed_digest
        if not self._holds(digest):
            await self._from_bucket(digest)
        return entry

    def _within_deadline(self, check: Deferred, route: Route) -> Deferred:
        """
        This client's wait for a tag check, given up at the registry's
        revalidate deadline as an upstream failure, so that the copy at
        hand is served at once.  Only this client's own Deferred is
        cancelled: the shared check goes on, updates the tag when it ends,
        and its failure, if nobody waits any more, is logged by the
        SingleFlight.
        """
        deadline = route.registry.revalidate_deadline

        def late(failure):
            failure.trap(TimeoutError)
            raise UpstreamError(
                f"upstream {route.registry.name} did not confirm the tag within {deadline * 1000:g} ms "
                "(--revalidate-deadline); the check goes on in the background"
            )

        return check.addTimeout(deadline, self.clock).addErrback(late)

    async def _stand_in(self, route, key: TagKey, known: Optional[TagEntry], types: Tuple[str, ...], want_body: bool):
        """
        The cached entry that may stand in for a tag upstream cannot confirm:
        this client's own, or else what another kind of client was served
        for the tag, if this client accepts its media type.  An outage then
        does not fail containerd just because only dockerd pulled the tag.
        """
        def usable(entry: TagEntry) -> bool:
            return self.policy.stale_allowed(route, entry) and (not want_body or self._holds(entry.parsed_digest))

        if known is not None and usable(known):
            return known
        for entry in await self.tags.siblings(key):
            if entry.media_type in types and usable(entry):
                return entry
        return None

    async def _unchecked(self, route, key: TagKey, known, types: Tuple[str, ...], want_body: bool):
        """
        For a client that may not make regcache contact upstream, a tag past
        its window is what the cache holds for it, unrevalidated, as when
        upstream fails (so ``max_stale`` bounds it too), and marked stale
        the same way; with nothing held, the client is asked to log in.
        """
        held = await self._stand_in(route, key, known, types, want_body)
        if held is None:
            _may_fetch(route, f"{route.name}:{key.tag}")
        return held, "stale", STALE_WARNING, held is known

    async def _check_tag(
        self, route: Route, tag: str, types: Tuple[str, ...], key: TagKey, known, retry: bool
    ) -> TagEntry:
        current = self.tags.cached(key)
        if current is not None and self.policy.fresh(route, current):
            # Another request's check ended while this one read the disk.
            return current
        info = await route.upstream.head_manifest(route.name, tag, list(types), retry=retry)
        now = self.clock.seconds()
        if info is None:
            # Upstream answered the HEAD but named no digest: only a GET can
            # tell.  Docker Hub always names it, so this costs no pulls there.
            m = _typed(await route.upstream.get_manifest(route.name, tag, list(types)))
            await self._keep(m)
            digest, media_type, size = m.digest, m.media_type, m.size
        else:
            digest = info.digest
            media_type, size = _described(info)
        if known is not None and known.digest == str(digest):
            # What regcache learned of this manifest (its own size and type)
            # stays: the same digest is the same bytes.
            return self.tags.touch(key, known, now)
        entry = self.tags.put(key, TagEntry(str(digest), media_type, size, now))
        if known is not None:
            self.log.info("Tag {name}:{tag} moved from {old} to {new}",
                          name=route.name, tag=tag, old=known.digest, new=str(digest))
        return entry

    # Blobs

    async def blob(self, route: Route, digest: Digest) -> BlobAnswer:
        # A fill this request started or joined decides the outcome, even
        # when it lands before the request reads it: the blob was not cached.
        cache = "hit"
        for _ in range(3):
            opened = self._opened(digest, self.store.open_blob, digest)
            if opened is not None:
                fd, size = opened
                try:
                    await self._confirmed(route, digest, "blob")
                except BaseException:
                    os.close(fd)
                    raise
                self.metrics.cache.labels("blob", cache).inc()
                self._used(digest)
                return BlobAnswer(size, fd, Source(size), cache, self.store.pin(digest))
            fill = self.fills.get(digest)
            confirmed = False
            if fill is None:
                cache = "miss"
                _may_fetch(route, f"blob {digest}")
                if self.fills.shared is not None:
                    # The bucket's copy may be another repository's: known
                    # to be this one's first, as a local copy would be.
                    await self._confirmed(route, digest, "blob")
                    confirmed = True
                    fill = self.fills.get(digest)
            if fill is None:
                fill = self.fills.start(route.upstream, route.name, digest)
                # Upstream sends it in this repository's scope, or nothing lands.
                self.store.link(digest, _repository(route))
            else:
                if cache == "hit":
                    cache = "join"
                if not confirmed:
                    await self._joinable(route, fill, digest)
            size = await self._started(fill, digest)
            if cache == "miss" and fill.source == BUCKET:
                # Not upstream's: another replica's download, in the bucket.
                cache = "shared"
            fd = self._opened(digest, fill.reader)
            if fd is not None:
                self.metrics.cache.labels("blob", cache).inc()
                self._used(digest)
                return BlobAnswer(size, fd, fill, cache, self.store.pin(digest))
            # The fill moved into the store meanwhile: open it there.
        raise RegistryError("UNAVAILABLE", f"blob {digest} could not be opened", status=503)

    async def blob_location(self, route: Route, digest: Digest, host: str, authorization: bool) -> Optional[str]:
        """
        Where a GET of ``digest`` sent to ``host`` is redirected (a
        presigned URL of the bucket's copy), or None to serve it here, once
        it passed what serving it would: a local miss is a fetch for the
        policy, as the bucket's copy is, and the repository must be known
        to hold it.  A fill under way here is followed, not redirected.
        """
        if self.redirects is None or not self.redirects.allowed(host, authorization):
            return None
        if self.fills.get(digest) is not None:
            return None
        entry = self.store.index.get(digest)
        if entry is None:
            _may_fetch(route, f"blob {digest}")
        await self._confirmed(route, digest, "blob")
        location = await self.redirects.location(digest, entry.size if entry is not None else None)
        if location is not None:
            self.metrics.cache.labels("blob", "redirect").inc()
            self._used(digest)
        return location

    def _used(self, digest: Digest) -> None:
        """A GET of ``digest`` was served or redirected: a use, for the bucket's eviction (regcache.sweeper)."""
        if self.uses is not None:
            self.uses.used(digest)

    async def blob_size(self, route: Route, digest: Digest):
        """
        (size, cache result) for a HEAD, without downloading: a HEAD that
        started a fill would pull the whole blob for a client that wants
        none of it, and could evict cached images to make room.  Upstream
        is asked with a HEAD, and nothing it says is cached.
        """
        opened = self._opened(digest, self.store.open_blob, digest)
        if opened is not None:
            fd, size = opened
            os.close(fd)
            await self._confirmed(route, digest, "blob")
            self.metrics.cache.labels("blob", "hit").inc()
            return size, "hit"
        fill = self.fills.get(digest)
        if fill is not None:
            await self._joinable(route, fill, digest)
            size = await self._started(fill, digest)
            self.metrics.cache.labels("blob", "join").inc()
            return size, "join"
        _may_fetch(route, f"blob {digest}")
        if self.fills.shared is not None:
            await self._confirmed(route, digest, "blob")
            size = await self.fills.shared.blob_size(digest)
            if size is not None:
                self.metrics.cache.labels("blob", "shared").inc()
                return size, "shared"
        try:
            size = await route.upstream.head_blob(route.name, digest)
        except UpstreamNotFound:
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {digest}")
        except UpstreamError as e:
            raise self.policy.failure(e, f"blob {digest}")
        self.metrics.cache.labels("blob", "miss").inc()
        return size, "miss"

    async def _joinable(self, route: Route, fill, digest: Digest) -> None:
        """
        Return once this request may follow ``fill``: one from this
        repository, or one whose blob this repository is known to hold.
        """
        if fill.upstream is not route.upstream or fill.name != route.name:
            await self._confirmed(route, digest, "blob")

    # Links

    async def _confirmed(self, route: Route, digest: Digest, kind: str) -> None:
        """
        Return once the route's repository is known to hold ``digest`` (a
        ``kind``, blob or manifest, regcache holds or is fetching); else
        ask upstream with a HEAD in that repository's scope, which costs no
        pull and links it when upstream confirms.  What upstream does not
        have there is unknown, as if it were not cached; while upstream
        cannot answer, it is not served under this name at all.
        """
        key = _repository(route)
        if await self.store.linked(digest, key):
            return
        if self.meta is not None and await self._look(("link", key, digest),
                                                      lambda: self.meta.linked(digest, key)):
            self.store.link(digest, key)
            return
        # Asking is contacting upstream: a client that may not make regcache
        # do so gets the challenge, as for any miss.
        _may_fetch(route, f"{kind} {route.name}@{digest}")
        flight = (key, digest, kind)
        if flight not in self._confirmations and len(self._confirmations) >= MAX_CONFIRMATIONS:
            raise RegistryError("UNAVAILABLE", f"{kind} {digest} is cached but not known to belong to "
                                f"{route.name}, and too many confirmations are under way", status=503)
        await self._confirmations.run(flight, lambda: Deferred.fromCoroutine(
            self._confirm(route, key, digest, kind)))

    async def _confirm(self, route: Route, key: RepoKey, digest: Digest, kind: str) -> None:
        counter = self.metrics.link_confirmations
        try:
            if kind == "manifest":
                await route.upstream.head_manifest(route.name, str(digest), list(MANIFEST_MEDIA_TYPES))
            else:
                await route.upstream.head_blob(route.name, digest)
        except UpstreamNotFound:
            counter.labels(route.registry.name, "unknown").inc()
            if kind == "manifest":
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {route.name}@{digest}")
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {digest}")
        except UpstreamError as e:
            counter.labels(route.registry.name, "failed").inc()
            raise RegistryError("UNAVAILABLE", f"{kind} {digest} is cached but not known to belong to "
                                f"{route.name}, and upstream cannot confirm it: {e}", status=503)
        counter.labels(route.registry.name, "confirmed").inc()
        self.log.info("Linked {digest} to {name}: upstream confirmed it holds the {kind}",
                      digest=str(digest), name=route.name, kind=kind, event="link")
        self.store.link(digest, key)

    def _opened(self, digest: Digest, open_, *args):
        """
        What ``open_`` gives, or a 503 if the cache cannot open the blob
        now (descriptors exhausted, I/O error): the blob is still cached,
        so this is a moment's unavailability, never a miss.
        """
        try:
            return open_(*args)
        except OSError as e:
            self.metrics.cache.labels("blob", "unreadable").inc()
            raise RegistryError("UNAVAILABLE", f"the cache cannot open blob {digest} now: {e.strerror}", status=503)

    async def _started(self, fill, digest: Digest) -> int:
        """A fill's size once upstream answered, its failure as the client's error."""
        try:
            return await fill.wait_started()
        except UpstreamNotFound:
            raise RegistryError("BLOB_UNKNOWN", f"blob unknown: {digest}")
        except UpstreamError as e:
            raise self.policy.failure(e, f"blob {digest}")
        except IntegrityError as e:
            raise RegistryError("UNAVAILABLE", f"upstream sent a bad blob: {e}", status=502)
        except BlobTooLarge as e:
            raise RegistryError("UNAVAILABLE", str(e))
        except OSError as e:
            raise RegistryError("UNAVAILABLE", f"cache cannot store the blob: {e.strerror}", status=503)

    # Referrers

    async def referrers(self, route: Route, digest: Digest, artifact_type: Optional[str]) -> ReferrersAnswer:
        """
        The referrers index of ``digest``, kept like a tag: fresh within the
        window, else asked again, and the last one served stale while
        upstream fails.  Upstream's 404 (no referrers API) is passed on even
        with a copy at hand: it is an answer, not an outage, and it sends
        clients to the ``sha256-<hex>`` tags.  It is kept like a tag too:
        within the window every subject of that repository gets the 404
        from memory, so a registry without the API costs one request per
        repository and window, not one per signature lookup (cosign,
        notation and oras each ask before they fall back to the tags).
        """
        if artifact_type is not None and not _MEDIA_TYPE_RE.fullmatch(artifact_type):
            raise RegistryError("UNSUPPORTED", "artifactType must be a media type", status=400)
        if self._holds(digest):
            # Nothing, cached or not, says of a subject that is not the
            # repository's which artifacts refer to it.
            await self._confirmed(route, digest, "manifest")
        what = f"the referrers of {route.name}@{digest}"
        repository = _repository(route)
        told = self._no_referrers.get(repository)
        if told is not None and self.clock.seconds() - told < route.registry.tag_ttl:
            self.metrics.cache.labels("referrers", "hit").inc()
            raise _no_referrers_api(what)
        key = ReferrersKey(route.registry.name, route.name, str(digest), artifact_type)
        known = await self.referrers_cache.get(key)
        if known is not None and self.policy.fresh(route, known):
            self.metrics.cache.labels("referrers", "hit").inc()
            return ReferrersAnswer(known.body, known.filtered, "hit")
        fallback = known if self.policy.stale_allowed(route, known) else None
        if fallback is not None and not route.client.may_fetch:
            self.metrics.cache.labels("referrers", "stale").inc()
            return ReferrersAnswer(fallback.body, fallback.filtered, "stale", STALE_WARNING)
        _may_fetch(route, what)
        try:
            entry = await self._referrers_gets.run(key, lambda: Deferred.fromCoroutine(
                self._fetch_referrers(route, digest, key, retry=fallback is None)))
        except UpstreamNotFound:
            self._no_referrers.pop(repository, None)
            self._no_referrers[repository] = self.clock.seconds()
            while len(self._no_referrers) > MAX_NO_REFERRERS:
                self._no_referrers.popitem(last=False)
            raise _no_referrers_api(what)
        except UpstreamError as e:
            if fallback is None:
                if e.status == 502:
                    # Upstream answered, wrongly: its fault, not an outage.
                    raise RegistryError("UNAVAILABLE", f"{what} is not cached and {e}", status=502)
                raise self.policy.failure(e, what)
            self.log.warn("Serving {what} from cache (fetched {age:.0f}s ago): upstream failed: {error}",
                          what=what, age=self.clock.seconds() - fallback.checked, error=str(e))
            self.metrics.cache.labels("referrers", "stale").inc()
            return ReferrersAnswer(fallback.body, fallback.filtered, "stale", STALE_WARNING)
        cache = "revalidated" if known is not None and known.body == entry.body else "miss"
        self.metrics.cache.labels("referrers", cache).inc()
        return ReferrersAnswer(entry.body, entry.filtered, cache)

    async def _fetch_referrers(self, route: Route, digest: Digest, key: ReferrersKey, retry: bool):
        answer = await route.upstream.referrers(route.name, digest, key.artifact_type, retry=retry)
        now = self.clock.seconds()
        # Another request's fetch may have ended while this one read the disk.
        known = await self.referrers_cache.get(key)
        if known is not None and (known.body, known.filtered) == (answer.body, answer.filtered):
            return self.referrers_cache.touch(key, known, now)
        return self.referrers_cache.put(key, ReferrersEntry(answer.body, answer.filtered, now))

    # Tag lists

    async def tags_list(self, route: Route, client_name: str, query: bytes):
        _may_fetch(route, f"the tag list of {client_name}")
        try:
            answer = await route.upstream.tags_list(route.name, query)
        except UpstreamNotFound:
            raise RegistryError("NAME_UNKNOWN", f"repository unknown: {client_name}")
        except UpstreamError as e:
            raise self.policy.failure(e, "the tag list")
        link = answer.link
        if link and route.name != client_name:
            link = [v.replace(f"/v2/{route.name}/".encode(), f"/v2/{client_name}/".encode()) for v in link]
        return answer.status, link, answer.body


def _repository(route: Route) -> RepoKey:
    """The key links are kept under: the upstream, and the repository as it names it."""
    return route.registry.name, route.name


def _no_referrers_api(what: str) -> RegistryError:
    return RegistryError("NAME_UNKNOWN", f"{what}: upstream offers no referrers API for it "
                         "(look for a sha256-<hex> tag)")


def _may_fetch(route: Route, what: str) -> None:
    """
    Refuse, with the challenge, a client that may pull only what is cached
    (``anonymous: cached-only``) when ``what`` is not: it must log in to
    make regcache contact an upstream on its behalf.
    """
    if not route.client.may_fetch:
        raise RegistryError("UNAUTHORIZED", f"{what} is not cached, and only clients that log in may have "
                            "regcache fetch it", status=401)


def _described(info: ManifestInfo) -> Tuple[str, int]:
    """
    The (media type, size) an upstream HEAD gives that regcache may relay:
    a manifest media type and a size a manifest can have.  Anything else
    (``text/html``, a length past MAX_MANIFEST, none) reads as unknown, and
    the manifest itself is fetched before a client is answered.
    """
    if info.media_type not in MANIFEST_MEDIA_TYPES:
        return "", -1
    if info.size is None or not 0 < info.size <= MAX_MANIFEST:
        return info.media_type, -1
    return info.media_type, info.size


def _typed(m: Manifest) -> Manifest:
    """
    ``m`` with a manifest media type: the Content-Type upstream sent if it
    is one, else the one its body declares.  Bytes that declare none are
    upstream's failure, and are not served as a manifest at all.
    """
    if m.media_type in MANIFEST_MEDIA_TYPES:
        return m
    declared = declared_type(m.body)
    if declared is None:
        raise UpstreamError(f"upstream sent a {m.media_type[:100]} body, not a manifest, for {m.digest}", 502)
    return Manifest(m.body, declared, m.digest)
