"""
Tag maps: which digest a tag named, when regcache last checked, per upstream.

A tag resolves differently depending on what the client accepts (a manifest
list, or Hub's linux/amd64 child for an old client), so an entry is keyed by
(upstream, name, tag, accepted-type set).  Entries persist as small JSON files
under ``tags/`` so a restart, or an upstream outage right after one, still
knows every tag it served.  They are hints, not content: losing one costs a
revalidation, never a wrong byte, so they are written without fsync.
"""

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

from twisted.logger import Logger

from regcache.reference import Digest


def accept_key(media_types: Iterable[str]) -> str:
    """
    A short stable name for a set of accepted media types.
    """
    joined = ",".join(sorted(set(media_types)))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TagKey:
    upstream: str
    name: str
    tag: str
    accept: str


@dataclass
class TagEntry:
    digest: str
    media_type: str
    size: int
    #: Wall-clock seconds of the last upstream answer that confirmed it.
    checked: float

    @property
    def parsed_digest(self) -> Digest:
        return Digest.parse(self.digest)


class TagMap:
    log = Logger()

    def __init__(self, root: str):
        self.root = os.path.join(root, "tags")
        self._tmp = os.path.join(root, "tmp")
        self._entries: Dict[TagKey, Optional[TagEntry]] = {}

    def _path(self, key: TagKey) -> str:
        upstream = key.upstream.replace(":", "_")
        return os.path.join(self.root, upstream, key.name, "_tags", key.tag, key.accept + ".json")

    def get(self, key: TagKey) -> Optional[TagEntry]:
        if key in self._entries:
            return self._entries[key]
        entry = None
        try:
            with open(self._path(key), encoding="utf-8") as f:
                entry = TagEntry(**json.load(f))
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, OSError):
            self.log.warn("Ignoring unreadable tag entry {path}", path=self._path(key))
        self._entries[key] = entry
        return entry

    def put(self, key: TagKey, entry: TagEntry) -> None:
        """
        Remember an entry, and persist it if the disk allows: on a full or
        failing disk the entry lives in memory only (it is a hint).
        """
        self._entries[key] = entry
        path = self._path(key)
        tmp = os.path.join(self._tmp, f"tag.{uuid.uuid4().hex}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(asdict(entry), f)
            os.replace(tmp, path)
        except OSError as e:
            self.log.warn("Could not persist tag entry {path}: {error}", path=path, error=e.strerror)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def siblings(self, key: TagKey) -> List[TagEntry]:
        """
        Entries for the same tag under other accepted-type sets, newest
        check first: what another kind of client was last served.
        """
        directory = os.path.dirname(self._path(key))
        try:
            names = [n for n in os.listdir(directory) if n.endswith(".json")]
        except FileNotFoundError:
            return []
        found = []
        for n in names:
            other = TagKey(key.upstream, key.name, key.tag, n[: -len(".json")])
            if other != key and self.get(other) is not None:
                found.append(self.get(other))
        return sorted(found, key=lambda e: e.checked, reverse=True)

    def touch(self, key: TagKey, checked: float) -> None:
        """
        Record a successful check of an unchanged tag.  Persisted too, so
        --max-stale measures from the real last check after a restart.
        """
        entry = self.get(key)
        if entry is not None:
            entry.checked = checked
            self.put(key, entry)
