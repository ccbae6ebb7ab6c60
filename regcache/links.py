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
(``<upstream> <name>``), written in the store's threads and read there when
a link is asked about.  Nothing per digest is held in memory: a store of a
million digests would need a container for each, and reading a million
files would be most of the start-up.  What memory holds is a bounded cache
(``Links``) of the links asked about or written lately, so a hot digest
costs no read.  The file goes with the content: eviction deletes it with the
data, and a line is written only while the data is there.  A line that does
not parse (a write cut short by a crash) is skipped; the link is confirmed
again.

A file holds at most CAP repositories: past that it is rewritten without
the oldest, and a dropped link is confirmed again by upstream when next
used.  The names in the keys are interned, so a repository linked to many
digests keeps one copy of its name.

Caches from before links have none: their content is unlinked, and is
linked again per repository on first use, for free through a tag (the tag
entry is the repository's own) and with one HEAD upstream otherwise.
"""

import os
import re
import sys
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

from regcache.reference import Digest

#: (upstream name, repository as upstream names it).
RepoKey = Tuple[str, str]

#: Repositories a links file holds.
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


def first_holding(paths: List[str], key: RepoKey) -> Optional[int]:
    """The position of the first links file in ``paths`` that names ``key``, or None.  Runs in a thread."""
    for n, path in enumerate(paths):
        if key in read(path):
            return n
    return None


def record(path: str, data_path: str, key: RepoKey, rewrite: Callable[[str, bytes], None]) -> None:
    """
    Add one link to its file, if the content is still there (a link never
    outlives its data) and the file does not name it yet: one small
    O_APPEND write, or past CAP a ``rewrite`` of the file without its
    oldest line.  Runs in a thread.
    """
    if not os.path.exists(data_path):
        return
    keys = read(path)
    if key in keys:
        return
    if len(keys) >= CAP:
        rewrite(path, b"".join(line(k) for k in keys[len(keys) - CAP + 1:] + [key]))
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line(key))
    finally:
        os.close(fd)


class Links:
    """
    The links asked about or written lately, least recently used first:
    at most ``size`` digests, each with the few repositories it was
    known under (at most PER_DIGEST).  Bookkeeping on the reactor; what is
    not here may still be in the files.
    """

    #: Digests remembered.
    SIZE = 16384
    #: Repositories remembered per digest.
    PER_DIGEST = 8

    def __init__(self, size: int = SIZE):
        self.size = size
        self._known: "OrderedDict[Digest, Tuple[RepoKey, ...]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def has(self, digest: Digest, key: RepoKey) -> bool:
        """Whether ``key`` is known to be linked to ``digest``; a use, for the LRU order."""
        keys = self._known.get(digest)
        if keys is None or key not in keys:
            return False
        self._known.move_to_end(digest)
        return True

    def add(self, digest: Digest, key: RepoKey) -> None:
        """Remember that ``key`` is linked to ``digest``."""
        keys = tuple(k for k in self._known.pop(digest, ()) if k != key)
        self._known[digest] = (keys + ((sys.intern(key[0]), sys.intern(key[1])),))[-self.PER_DIGEST:]
        while len(self._known) > self.size:
            self._known.popitem(last=False)

    def drop(self, digest: Digest) -> None:
        """The content is gone, and its links with it."""
        self._known.pop(digest, None)
