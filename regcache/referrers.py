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
the TagMap.  A file is one
JSON line of metadata, then the index bytes verbatim; losing one costs a
refetch, never a wrong byte.  Disk work runs in the store's thread runner,
and writes of one key one at a time, the newest last.
"""

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from regcache.manifests import check_index
from regcache.remote import MAX_REFERRERS
from regcache.tags import TOUCH_EVERY, read_entry, write_entry

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


class ReferrersCache:
    log = Logger()

    def __init__(self, root: str, run, tags, memory: int = MEMORY):
        """
        ``run`` is the store's thread runner; ``tags`` the TagMap, whose
        bound and eviction cover these files too.
        """
        self.root = os.path.join(root, "tags")
        self._tmp = os.path.join(root, "tmp")
        self._run = run
        self._tags = tags
        self._memory = memory
        self._bytes = 0
        self._entries: "OrderedDict[ReferrersKey, ReferrersEntry]" = OrderedDict()
        self._unsaved: Dict[ReferrersKey, ReferrersEntry] = {}
        self._writing: Dict[ReferrersKey, ReferrersEntry] = {}

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

    # Reading

    def get(self, key: ReferrersKey) -> Deferred:
        """A Deferred of the entry for ``key``, or of None."""
        self._tags.used(self._path(key))
        entry = self._known(key)
        if entry is not None:
            return succeed(entry)
        d = self._run(read_entry, self._path(key), MAX_REFERRERS + 4096)
        d.addCallback(self._loaded, key)
        return d

    def _known(self, key: ReferrersKey) -> Optional[ReferrersEntry]:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        return self._unsaved.get(key) or self._writing.get(key)

    def _loaded(self, found, key: ReferrersKey) -> Optional[ReferrersEntry]:
        data, problem = found
        # Whatever the reactor learned while the read ran is newer.
        entry = self._known(key)
        if entry is not None:
            return entry
        if problem is None and data is not None:
            try:
                entry = ReferrersEntry.from_file(data)
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            self.log.warn("Ignoring unreadable referrers entry {path}: {problem}",
                          path=self._path(key), problem=problem)
            return None
        if entry is not None:
            self._remember(key, entry)
        return entry

    # Writing

    def put(self, key: ReferrersKey, entry: ReferrersEntry) -> ReferrersEntry:
        """Remember an entry now and write it in the background."""
        entry = replace(entry, saved=entry.checked)
        self._remember(key, entry)
        self._unsaved[key] = entry
        if key not in self._writing:
            self._write(key)
        return entry

    def touch(self, key: ReferrersKey, entry: ReferrersEntry, checked: float) -> ReferrersEntry:
        """
        Record a fetch that found ``entry`` unchanged, written down only
        once TOUCH_EVERY passed since its file was (as tags.TagMap.touch).
        """
        if checked - entry.saved >= TOUCH_EVERY:
            return self.put(key, replace(entry, checked=checked))
        entry = replace(entry, checked=checked)
        self._remember(key, entry)
        return entry

    def _remember(self, key: ReferrersKey, entry: ReferrersEntry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body)
        self._entries[key] = entry
        self._bytes += len(entry.body)
        while self._bytes > self._memory and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped.body)

    def _write(self, key: ReferrersKey) -> None:
        entry = self._unsaved.pop(key)
        self._writing[key] = entry
        d = self._run(write_entry, self._dir(key), self._path(key), self._tmp, entry.to_file())
        d.addCallback(self._tags.wrote, self._path(key))
        d.addErrback(lambda f: self.log.warn(
            "Could not persist referrers entry {path}: {error}", path=self._path(key), error=f.getErrorMessage()))
        d.addBoth(lambda _: self._written(key))

    def _written(self, key: ReferrersKey) -> None:
        del self._writing[key]
        if key in self._unsaved:
            self._write(key)
