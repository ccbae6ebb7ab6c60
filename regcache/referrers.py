# test-case-name: tests.test_referrers
"""
Referrer indexes (OCI 1.1): what an upstream answered when asked which
artifacts (signatures, SBOMs, attestations) refer to a manifest.

Such an index changes whenever someone signs or attests an image, so it is
kept like a tag, not like content: keyed by (upstream, name, digest,
artifactType), fresh for the tag window and served stale while upstream
fails, both decided by the policy from ``checked`` as for tag entries.

Memory holds the most recently used indexes within a byte budget (an index
may be up to MAX_REFERRERS).  Each also lives in a small file beside the
tag entries, ``tags/<upstream>/<name>/_referrers/<alg>-<hex>/<filter>.json``
(no repository name component can start with ``_``), so a restart still has
it.  The files fall under the tag files' bound and eviction (regcache.tags):
TagMap.count finds them at start-up, and each write and read is reported to
the TagMap.  A file is one JSON line of metadata, then the index bytes
verbatim; losing one costs a refetch, never a wrong byte.  Reading and
writing them is tags.EntryFiles', shared with the tag entries.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Optional

from regcache.manifests import check_index
from regcache.remote import MAX_REFERRERS
from regcache.tags import EntryFiles

#: Bytes of indexes kept in memory, least recently used out first.
MEMORY = 32 * 1024 * 1024


@dataclass(frozen=True)
class ReferrersKey:
    upstream: str
    name: str
    digest: str
    #: The client's artifactType filter, or None for every referrer.
    artifact_type: Optional[str]


@dataclass(frozen=True)
class ReferrersEntry:
    #: The image index, as upstream sent it (checked by check_index).
    body: bytes
    #: Whether upstream applied the artifactType filter.
    filtered: bool
    #: Clock seconds of the upstream answer.
    checked: float
    #: The ``checked`` its file holds; not itself written.
    saved: float = field(default=-1.0, compare=False, repr=False)

    def to_file(self) -> bytes:
        head = json.dumps({"filtered": self.filtered, "checked": self.checked}).encode("utf-8")
        return head + b"\n" + self.body

    @classmethod
    def from_file(cls, data: bytes) -> "ReferrersEntry":
        """Raises ValueError for anything but an entry this version wrote."""
        head, newline, body = data.partition(b"\n")
        try:
            doc = json.loads(head)
            entry = cls(body, bool(doc["filtered"]), float(doc["checked"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a referrers entry: {e}")
        if not newline:
            raise ValueError("not a referrers entry: no index")
        check_index(body)
        return replace(entry, saved=entry.checked)


class ReferrersCache(EntryFiles):
    what = "referrers entry"
    read_limit = MAX_REFERRERS + 4096

    def __init__(self, root: str, run, tags, memory: int = MEMORY):
        """
        ``run`` is the store's thread runner; ``tags`` the TagMap, whose
        bound and eviction cover these files too.
        """
        super().__init__(root, run)
        self._tags = tags
        self._memory = memory
        self._bytes = 0

    def _dir(self, key: ReferrersKey) -> str:
        upstream = key.upstream.replace(":", "_")
        return os.path.join(self.root, upstream, key.name, "_referrers", key.digest.replace(":", "-"))

    def _path(self, key: ReferrersKey) -> str:
        # artifactType is the client's: only its hash names a file.
        if key.artifact_type is None:
            name = "all"
        else:
            name = "type-" + hashlib.sha256(key.artifact_type.encode("utf-8")).hexdigest()[:32]
        return os.path.join(self._dir(key), name + ".json")

    def _parse(self, data: bytes) -> ReferrersEntry:
        return ReferrersEntry.from_file(data)

    def _serialize(self, entry: ReferrersEntry) -> bytes:
        return entry.to_file()

    def _remember(self, key: ReferrersKey, entry: ReferrersEntry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body)
        self._entries[key] = entry
        self._bytes += len(entry.body)
        while self._bytes > self._memory and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped.body)

    def used(self, path: str) -> None:
        self._tags.used(path)

    def wrote(self, result, path: str) -> None:
        self._tags.wrote(result, path)
