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
name, and a digest's links are one tuple, which the start-up scan shares
between every digest whose links file has the same bytes: a store of a
million blobs pulled through a few repositories keeps a few tuples, not a
million.

Caches from before links have none: their content is unlinked, and is
linked again per repository on first use, for free through a tag (the tag
entry is the repository's own) and with one HEAD upstream otherwise.
"""

import os
import re
import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

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


#: Distinct link files a start-up scan remembers the parse of, and the
#: largest it remembers: at most 16 MiB of file bytes held.
MEMO = 4096
MEMO_FILE = 4096


def read_head(path: str, limit: int) -> Optional[bytes]:
    """
    Up to ``limit`` bytes of a small file, or None if it is missing: plain
    ``os.read`` calls with no buffered file object, for scans of a million
    files (links here, manifests in regcache.store).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        chunks, left = [], limit
        while left:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except IsADirectoryError:
        return None
    finally:
        os.close(fd)


def read(path: str) -> List[RepoKey]:
    """A link file's links (none if it is missing).  Runs in a thread."""
    data = read_head(path, MAX_FILE)
    return parse(data) if data else []


def reader() -> Callable[[str], Tuple[RepoKey, ...]]:
    """
    ``read`` for the start-up scan of every links file: interned keys, and
    one tuple for all the files with the same bytes (up to MEMO small ones).
    """
    memo: Dict[bytes, Tuple[RepoKey, ...]] = {}

    def read_one(path: str) -> Tuple[RepoKey, ...]:
        data = read_head(path, MAX_FILE)
        if not data:
            return ()
        keys = memo.get(data)
        if keys is None:
            keys = tuple(Links._intern(k) for k in parse(data))
            if len(memo) < MEMO and len(data) <= MEMO_FILE:
                memo[data] = keys
        return keys

    return read_one


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

    A digest's links are a tuple, never changed in place (it may be shared
    with other digests): a use that reorders them, or a new link, makes a
    new one.  Most digests have one link or a few, so that is cheap; one
    with CAP links costs a copy of CAP pointers per reordering use.
    """

    def __init__(self, cap: int = CAP):
        self.cap = cap
        self._by_digest: Dict[Digest, Tuple[RepoKey, ...]] = {}

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
        if keys[-1] != key:
            self._by_digest[digest] = tuple(k for k in keys if k != key) + (keys[keys.index(key)],)
        return True

    def keys(self, digest: Digest) -> List[RepoKey]:
        return list(self._by_digest.get(digest, ()))

    def add(self, digest: Digest, key: RepoKey) -> Optional[bool]:
        """
        Link ``key`` to ``digest``.  None if it already was; else whether
        the oldest link made way for it (the file must then be rewritten
        rather than appended to).
        """
        if self.has(digest, key):
            return None
        keys = self._by_digest.get(digest, ()) + (self._intern(key),)
        dropped = len(keys) > self.cap
        self._by_digest[digest] = keys[-self.cap:]
        return dropped

    def drop(self, digest: Digest) -> None:
        """The content is gone, and its links with it."""
        self._by_digest.pop(digest, None)

    def load(self, found: Dict[Digest, Tuple[RepoKey, ...]], stored) -> None:
        """
        Take the links a start-up scan found (interned, as ``reader`` makes
        them; for stored digests only) as the table, with those learned
        meanwhile, which are newer, after them.  Links learned for a digest
        the store turned out not to hold are dropped.
        """
        live, self._by_digest = self._by_digest, found
        for digest, keys in live.items():
            if digest in stored:
                old = found.get(digest, ())
                kept = set(keys)
                found[digest] = (tuple(k for k in old if k not in kept) + keys)[-self.cap:]
