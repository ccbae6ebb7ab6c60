# test-case-name: tests.test_shared,tests.integration.test_shared_proc
"""
What a pull needs besides blobs, in the shared bucket: manifests, the last
known digest of each tag, and which repositories hold which digest.

Blobs alone in the bucket would leave a replica that never saw an image
asking upstream for its manifests, its tags and, for every digest, a HEAD
to confirm the repository holds it (a 503 while upstream is down).  With
these beside them, any replica serves any cached pull with upstream gone.

Layout, under the bucket's prefix::

    manifests/sha256/<xx>/<hex>                   the bytes; the media type in metadata
    tags/<registry>/<name>/<tag>/<accept key>     a tag entry's JSON (regcache.tags)
    links/sha256/<hex>/<registry>/<name>          empty: the repository holds the digest

A registry's name may hold ``:`` or brackets (``[::1]:5000``), so it is
escaped (``_`` and two hex digits); repository names and tags are already
of a safe alphabet, and a tag has no ``/``, so no two keys meet.

Nothing read here is trusted more than upstream: a manifest is served only
if its bytes match its digest and it is a manifest, a tag entry only if it
parses, and a tag's checked time is never taken as later than now.  Links
and tags carry no content, so what they can get wrong is bounded: a link
names a repository that held the digest, and a tag entry is served only
within the window of its own checked time, as a local one would be.  A tag
written by a replica whose check is older can replace a newer one; that
costs a revalidation sooner, never an answer older than the window allows.

Writes are in the background: they never delay or fail a pull, each one
failed is logged and counted, and what is under way is bounded
(``MAX_WRITES``): past it a write is dropped (counted), which costs only
sharing.  At most one write per object is in flight; a newer version
waiting behind it replaces any older one waiting.
"""

import re
from collections import OrderedDict
from typing import Callable, Dict, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from regcache.links import RepoKey
from regcache.manifests import MANIFEST_MEDIA_TYPES, MAX_MANIFEST, Manifest, declared_type
from regcache.reference import Digest
from regcache.s3 import StorageError
from regcache.tags import TagEntry, TagKey

#: Bucket writes under way or waiting, over all kinds.
MAX_WRITES = 1024

#: Links known to be in the bucket, so that linking them locally does not
#: write them again (least recently used out first).
KNOWN_LINKS = 10_000

#: The metadata key a manifest's media type is kept under.
MEDIA_TYPE = "media-type"

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")


def escaped(name: str) -> str:
    """``name`` in ``[A-Za-z0-9.-_]`` alone, one to one: what an upstream's name is in a key."""
    return _UNSAFE.sub(lambda m: "".join(f"_{b:02x}" for b in m.group().encode("utf-8")), name)


def manifest_name(digest: Digest) -> str:
    return f"manifests/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def tag_name(key: TagKey) -> str:
    return f"tags/{escaped(key.upstream)}/{key.name}/{key.tag}/{key.accept}"


def link_name(digest: Digest, key: RepoKey) -> str:
    return f"links/{digest.algorithm}/{digest.hex}/{escaped(key[0])}/{key[1]}"


class SharedMeta:
    """
    Manifests, tags and links in the shared level's bucket.  ``level`` is
    the SharedLevel (regcache.shared): its bucket, metrics, reactor and
    the deadline of each look on a client's path.
    """

    log = Logger()

    def __init__(self, level, max_writes: int = MAX_WRITES, known_links: int = KNOWN_LINKS):
        self.level = level
        self.bucket = level.bucket
        self.metrics = level.metrics
        self.reactor = level.reactor
        self.max_writes = max_writes
        self.known_links = known_links
        #: Object name -> the write waiting behind the one in flight (or
        #: None): one write per object at a time, the newest next.
        self._writing: Dict[str, Optional[Callable[[], Deferred]]] = {}
        self._waiting = 0
        self._linked: "OrderedDict[tuple, None]" = OrderedDict()

    # Looking

    async def _look(self, kind: str, name: str, parse):
        """
        What ``parse`` makes of the bucket's ``name`` (None if it has none
        or it is not valid), within the level's deadline; the bucket
        failing or late is None too, and counted.
        """
        try:
            found = await self.level._within(Deferred.fromCoroutine(self.bucket.read(name)), f"GET {name}")
        except StorageError as e:
            self.metrics.shared_lookups.labels(kind, "failed").inc()
            self.log.warn("The bucket cannot be read for {name}: {error}; going on without it",
                          name=name, error=str(e))
            return None
        if found is None:
            self.metrics.shared_lookups.labels(kind, "miss").inc()
            return None
        value = parse(*found)
        if value is None:
            self.metrics.shared_lookups.labels(kind, "invalid").inc()
            self.log.warn("Ignoring the bucket's {name}: it is not what its name says", name=name)
            return None
        self.metrics.shared_lookups.labels(kind, "hit").inc()
        return value

    async def manifest(self, digest: Digest) -> Optional[Manifest]:
        """The bucket's copy of the manifest ``digest``, checked against it, or None."""

        def parse(info, body: bytes) -> Optional[Manifest]:
            if len(body) > MAX_MANIFEST or Digest.of(body, digest.algorithm) != digest:
                return None
            media_type = info.metadata.get(MEDIA_TYPE, "")
            if media_type not in MANIFEST_MEDIA_TYPES:
                media_type = declared_type(body)
                if media_type is None:
                    return None
            return Manifest(body, media_type, digest)

        return await self._look("manifest", manifest_name(digest), parse)

    async def tag(self, key: TagKey) -> Optional[TagEntry]:
        """The bucket's entry for ``key``, its checked time no later than now, or None."""

        def parse(info, body: bytes) -> Optional[TagEntry]:
            try:
                entry = TagEntry.from_json(body)
            except ValueError:
                return None
            if entry.checked > self.reactor.seconds():
                # Another replica's clock ahead of this one's must not make
                # the entry fresh for longer than the window.
                return TagEntry(entry.digest, entry.media_type, entry.size, self.reactor.seconds())
            return entry

        return await self._look("tag", tag_name(key), parse)

    async def linked(self, digest: Digest, key: RepoKey) -> bool:
        """Whether the bucket says the repository ``key`` holds ``digest``."""
        found = await self._look("link", link_name(digest, key), lambda info, body: True)
        if found:
            self._known(digest, key)
        return bool(found)

    def _known(self, digest: Digest, key: RepoKey) -> bool:
        """Remember that the bucket holds this link; whether it was known already."""
        entry = (digest, key)
        if entry in self._linked:
            self._linked.move_to_end(entry)
            return True
        self._linked[entry] = None
        while len(self._linked) > self.known_links:
            self._linked.popitem(last=False)
        return False

    # Writing

    def put_manifest(self, m: Manifest) -> None:
        """Share a manifest whose bytes were checked against its digest, create-only."""
        name = manifest_name(m.digest)
        self._write("manifest", name, lambda: Deferred.fromCoroutine(self.bucket.put(
            name, m.body, m.media_type, {MEDIA_TYPE: m.media_type}, create_only=True)))

    def put_tag(self, key: TagKey, entry: TagEntry) -> None:
        """Share a tag's entry as this replica last checked it."""
        name, body = tag_name(key), entry.to_json()
        self._write("tag", name, lambda: Deferred.fromCoroutine(self.bucket.put(
            name, body, "application/json")))

    def link(self, digest: Digest, key: RepoKey) -> None:
        """Share that the repository ``key`` holds ``digest``, unless the bucket is known to have it."""
        if (digest, key) in self._linked:
            return
        name = link_name(digest, key)

        def write() -> Deferred:
            d = Deferred.fromCoroutine(self.bucket.put(name, b"", create_only=True))
            return d.addCallback(lambda created: (self._known(digest, key), created)[1])

        self._write("link", name, write)

    def _write(self, kind: str, name: str, write: Callable[[], Deferred]) -> None:
        if name in self._writing:
            if self._writing[name] is None:
                self._waiting += 1
            self._writing[name] = write
            return
        if len(self._writing) + self._waiting >= self.max_writes:
            self.metrics.shared_uploads.labels(kind, "dropped").inc()
            return
        self._writing[name] = None
        self._run(kind, name, write)

    def _run(self, kind: str, name: str, write: Callable[[], Deferred]) -> None:
        def done(created) -> None:
            self.metrics.shared_uploads.labels(kind, "uploaded" if created else "present").inc()

        def failed(f) -> None:
            f.trap(StorageError)
            self.metrics.shared_uploads.labels(kind, "failed").inc()
            self.log.warn("Could not share {name} in the bucket: {error}", name=name, error=f.getErrorMessage())

        def next_(_) -> None:
            waiting = self._writing.get(name)
            if waiting is None:
                del self._writing[name]
                return
            self._writing[name] = None
            self._waiting -= 1
            self._run(kind, name, waiting)

        d = write()
        d.addCallbacks(done, failed)
        d.addErrback(lambda f: self.log.failure("Sharing {name} failed", f, name=name))
        d.addBoth(next_)
