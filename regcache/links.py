# test-case-name: tests.test_links
"""
Which repositories hold which digest: the per-repository links that keep
content stored once per digest from being served under any name.

A digest cached for ``myorg/secret`` must not be readable as
``library/alpine@<digest>``.  So the mirror serves a digest under a
repository only where it knows the repository holds it: upstream sent it
(or said it holds it) in that repository's scope, or a manifest of that
repository names it.  The first kind are links, kept here; the second are
derived from the manifests the index holds (regcache.index), and written as
links the first time they are used, so a layer stays linked after the
manifest that named it is evicted.

On disk a digest's links are one small file beside its data,
``links/<alg>/<2 hex>/<hex>``, one repository a line
(``<upstream> <name>``), appended in the store's threads and read back at
the start-up scan: checking a link in a request is a lookup in memory.  The
file goes with the content: eviction deletes it with the data, and a line
is written only while the data is there.  A line that does not parse (a
write cut short by a crash) is skipped; the link is confirmed again.

Memory is bounded per digest: at most CAP repositories, the least recently
used dropped first (the file is then rewritten without it), and a dropped
link is confirmed again by upstream when next used.  The names in the keys
are interned, so a repository linked to many digests keeps one copy of its
name.

Caches from before links have none: their content is unlinked, and is
linked again per repository on first use, for free through a tag (the tag
entry is the repository's own) and with one HEAD upstream otherwise.
"""

import os
import re
import sys
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

from regcache.reference import Digest

#: (upstream name, repository as upstream names it).
RepoKey = Tuple[str, str]

#: Repositories remembered per digest.
CAP = 1000

#: Larger link files are read only this far (CAP lines are far less).
MAX_FILE = 1024 * 1024

#: An upstream's name: a config file's (``[A-Za-z0-9._-]``), or with one
#: ``--upstream`` its host, port and all (``127.0.0.1:5000``, ``[::1]:5000``).
_UPSTREAM_RE = re.compile(r"[^\s\ufffd]{1,255}")
_NAME_RE = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")


def line(key: RepoKey) -> bytes:
    """The file line of one link."""
    return f"{key[0]} {key[1]}\n".encode("utf-8")


def parse(data: bytes) -> List[RepoKey]:
    """
    The links a file's bytes hold, oldest first, each once, at most CAP
    (the newest): lines that are not a link, or not whole, are skipped.
    """
    found: "OrderedDict[RepoKey, None]" = OrderedDict()
    for raw in data.split(b"\n")[:-1]:
        upstream, _, name = raw.decode("utf-8", "replace").partition(" ")
        if _UPSTREAM_RE.fullmatch(upstream) and len(name) <= 255 and _NAME_RE.fullmatch(name):
            key = (upstream, name)
            found.pop(key, None)
            found[key] = None
    keys = list(found)
    return keys[-CAP:]


def read(path: str) -> List[RepoKey]:
    """A link file's links (none if it is missing).  Runs in a thread."""
    try:
        with open(path, "rb") as f:
            return parse(f.read(MAX_FILE))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []


def append(path: str, data_path: str, key: RepoKey) -> None:
    """
    Add one link to its file, if the content is still there: a link never
    outlives its data.  One small O_APPEND write; runs in a thread.
    """
    if not os.path.exists(data_path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line(key))
    finally:
        os.close(fd)


class Links:
    """
    The links of every digest the store holds, in memory, least recently
    used first per digest.  Bookkeeping on the reactor; the store writes.
    """

    def __init__(self, cap: int = CAP):
        self.cap = cap
        self._by_digest: Dict[Digest, "OrderedDict[RepoKey, None]"] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    @staticmethod
    def _intern(key: RepoKey) -> RepoKey:
        return sys.intern(key[0]), sys.intern(key[1])

    def has(self, digest: Digest, key: RepoKey) -> bool:
        """Whether ``key`` is linked to ``digest``; a use, for the LRU order."""
        keys = self._by_digest.get(digest)
        if keys is None or key not in keys:
            return False
        keys.move_to_end(key)
        return True

    def keys(self, digest: Digest) -> List[RepoKey]:
        return list(self._by_digest.get(digest, ()))

    def add(self, digest: Digest, key: RepoKey) -> Optional[bool]:
        """
        Link ``key`` to ``digest``.  None if it already was; else whether
        the oldest link made way for it (the file must then be rewritten
        rather than appended to).
        """
        keys = self._by_digest.setdefault(digest, OrderedDict())
        if key in keys:
            keys.move_to_end(key)
            return None
        keys[self._intern(key)] = None
        dropped = False
        while len(keys) > self.cap:
            keys.popitem(last=False)
            dropped = True
        return dropped

    def drop(self, digest: Digest) -> None:
        """The content is gone, and its links with it."""
        self._by_digest.pop(digest, None)

    def merge(self, digest: Digest, keys: Iterable[RepoKey]) -> None:
        """Links found on disk, older than those in memory: added before them."""
        live = self._by_digest.pop(digest, OrderedDict())
        merged: "OrderedDict[RepoKey, None]" = OrderedDict()
        for key in keys:
            merged[self._intern(key)] = None
        for key in live:
            merged.pop(key, None)
            merged[key] = None
        while len(merged) > self.cap:
            merged.popitem(last=False)
        if merged:
            self._by_digest[digest] = merged

    def only(self, digests) -> None:
        """Keep the links of ``digests`` alone: what a start-up scan found stored."""
        self._by_digest = {d: keys for d, keys in self._by_digest.items() if d in digests}
