# test-case-name: tests.test_tags
"""
Tag maps: which digest a tag named, when regcache last checked, per upstream.

A tag resolves differently depending on what the client accepts (a manifest
list, or Hub's linux/amd64 child for an old client), so an entry is keyed by
(upstream, name, tag, accepted types).  The accepted types are the subset of
the manifest media types regcache serves that the client's Accept admits,
never the raw header: whatever clients send, a tag has at most 63 keys (one
per non-empty subset of six types), and real clients make two or three.

Entries persist as small JSON files, ``tags/<upstream>/<name>/_tags/<tag>/
<key>.json``, so a restart, or an upstream outage right after one, still
knows every tag it served.  They are hints, not content: losing one costs a
revalidation, never a wrong byte, so they are written without fsync, and an
entry the disk refuses lives in memory only.

All disk work runs in the store's thread runner.  A read of an entry not in
memory waits for it; a write is handed to it and not waited for: until it
lands, the entry is served from memory.  Writes of one entry run one at a
time, the newest last, so a pool of threads cannot land an older one over a
newer one.  Memory holds a bounded number of entries, least recently used
out first, and nothing for a tag upstream does not have.

Tag files never crowd out content.  Clients choose names, tags and Accept
sets, so what tag files take is bounded by itself, not by eviction of blobs:
a twentieth of the store's size limit, 1 MiB at least (``TAG_SHARE``,
``TAG_FLOOR``), or ``TAG_BOUND`` with no limit.  Past it the least recently
written or read files are deleted, with the directories they leave empty,
in the runner, down to three quarters of the bound.  Those bytes are not
part of ``Index.total``: the store holds up to --max-size of content plus
its tag bound, and a flood of HEADs can cost revalidations, never an image.
What the files take is counted in whole blocks, as a filesystem allocates
them: start-up counts them in the walk it already makes (and removes
entries of older layouts, which nothing reads any more), oldest first, and
each write adds what it changed.
"""

import json
import os
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from regcache.manifests import MANIFEST_MEDIA_TYPES
from regcache.reference import TAG_RE, Digest, InvalidReference

#: Entries kept in memory, least recently used out first.  About 1 KiB each.
MEMORY = 10_000

#: Seconds a revalidation that found a tag unchanged may go without being
#: written down.  A restart then sees the tag as up to this much older than
#: it is, which only errs toward revalidating sooner and serving stale less
#: long (--max-stale), never toward serving an answer older than allowed;
#: in return a hot tag costs one write per five minutes, not one per window.
TOUCH_EVERY = 300.0

#: What a filesystem allocates at least, per file and per directory.
BLOCK = 4096

#: Tag files may take this share of the store's size limit (1/20), at
#: least TAG_FLOOR (256 files), and TAG_BOUND when there is no limit.
TAG_SHARE = 20
TAG_FLOOR = 1024 * 1024
TAG_BOUND = 256 * 1024 * 1024


def accepted(accept: Iterable[str]) -> Tuple[str, ...]:
    """
    The manifest media types a client's Accept list admits, in the fixed
    order.  No Accept at all, ``*/*`` and ``application/*`` admit them all.
    """
    patterns = {a.split(";")[0].strip().lower() for a in accept}
    if not patterns or "*/*" in patterns:
        return MANIFEST_MEDIA_TYPES
    return tuple(t for t in MANIFEST_MEDIA_TYPES if t in patterns or t.split("/")[0] + "/*" in patterns)


def accept_key(types: Iterable[str]) -> str:
    """The file name of a set of manifest media types: their bits in MANIFEST_MEDIA_TYPES, in hex."""
    wanted = set(types)
    mask = sum(1 << i for i, t in enumerate(MANIFEST_MEDIA_TYPES) if t in wanted)
    return f"{mask:02x}"


_ALL_KEYS = [f"{mask:02x}" for mask in range(1, 2 ** len(MANIFEST_MEDIA_TYPES))]
_KEY_FILES = {key + ".json": key for key in _ALL_KEYS}


@dataclass(frozen=True)
class TagKey:
    upstream: str
    name: str
    tag: str
    accept: str


@dataclass(frozen=True)
class TagEntry:
    digest: str
    media_type: str
    #: -1 when not known (upstream's HEAD gave no size regcache trusts).
    size: int
    #: Clock seconds of the last upstream answer that confirmed it.
    checked: float
    #: The ``checked`` its file holds; not itself written.
    saved: float = field(default=-1.0, compare=False, repr=False)

    @property
    def parsed_digest(self) -> Digest:
        return Digest.parse(self.digest)

    def to_json(self) -> bytes:
        return json.dumps(
            {"digest": self.digest, "media_type": self.media_type, "size": self.size, "checked": self.checked}
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "TagEntry":
        """Raises ValueError for anything but an entry this version wrote."""
        try:
            doc = json.loads(data)
            entry = cls(str(doc["digest"]), str(doc["media_type"]), int(doc["size"]), float(doc["checked"]))
            entry.parsed_digest
        except (KeyError, TypeError, AttributeError, InvalidReference) as e:
            raise ValueError(f"not a tag entry: {e}")
        return replace(entry, saved=entry.checked)


class EntryFiles:
    """
    Small entries kept in memory and, one file each, under ``tags/``: tag
    entries here, referrer indexes in regcache.referrers.  Reads and writes
    run in the store's thread runner; an entry is served from memory while
    its write is under way, and writes of one key go one at a time, the
    newest last.  A subclass names the files, parses and serializes
    entries, bounds memory (``_remember``), and hears of each file read and
    written (``used``, ``wrote``), which is where the disk bound lives.
    """

    log = Logger()

    #: What one file may hold, read back; and what an entry is called in logs.
    read_limit = 64 * 1024
    what = "entry"

    def __init__(self, root: str, run):
        self.root = os.path.join(root, "tags")
        self._tmp = os.path.join(root, "tmp")
        self._run = run
        self._entries: OrderedDict = OrderedDict()
        #: Entries whose newest version is not on disk yet, and the keys
        #: with a write under way: at most one per key at a time.
        self._unsaved: Dict = {}
        self._writing: Dict = {}

    def _path(self, key) -> str:
        raise NotImplementedError

    def _dir(self, key) -> str:
        raise NotImplementedError

    def _parse(self, data: bytes):
        """The entry a file holds; ValueError for anything this version did not write."""
        raise NotImplementedError

    def _serialize(self, entry) -> bytes:
        raise NotImplementedError

    def _remember(self, key, entry) -> None:
        raise NotImplementedError

    def used(self, path: str) -> None:
        """The file at ``path`` was asked for."""

    def wrote(self, result: Tuple[int, int], path: str) -> None:
        """The file at ``path`` was written: write_entry's result."""

    # Reading

    def get(self, key) -> Deferred:
        """A Deferred of the entry for ``key``, or of None."""
        path = self._path(key)
        self.used(path)
        entry = self._known(key)
        if entry is not None:
            return succeed(entry)
        d = self._run(read_entry, path, self.read_limit)
        d.addCallback(self._loaded, key)
        return d

    def cached(self, key):
        """The entry for ``key`` if memory has it: what get gives without the disk."""
        return self._known(key)

    def _known(self, key):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        return self._unsaved.get(key) or self._writing.get(key)

    def _loaded(self, found, key):
        data, problem = found
        # Whatever the reactor learned while the read ran is newer.
        entry = self._known(key)
        if entry is not None:
            return entry
        if problem is None and data is not None:
            try:
                entry = self._parse(data)
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            self.log.warn("Ignoring unreadable {what} {path}: {problem}",
                          what=self.what, path=self._path(key), problem=problem)
            return None
        if entry is not None:
            self._remember(key, entry)
        return entry

    # Writing

    def put(self, key, entry):
        """
        Remember an entry now and write it in the background.  Returns the
        entry as remembered.
        """
        entry = replace(entry, saved=entry.checked)
        self._remember(key, entry)
        self._unsaved[key] = entry
        if key not in self._writing:
            self._write(key)
        return entry

    def touch(self, key, entry, checked: float):
        """
        Record a check that found ``entry`` unchanged.  Written down only
        once TOUCH_EVERY passed since its file was, so that --max-stale
        measures from about the real last check after a restart.
        """
        if checked - entry.saved >= TOUCH_EVERY:
            return self.put(key, replace(entry, checked=checked))
        entry = replace(entry, checked=checked)
        self._remember(key, entry)
        return entry

    def _write(self, key) -> None:
        entry = self._unsaved.pop(key)
        self._writing[key] = entry
        path = self._path(key)
        d = self._run(write_entry, self._dir(key), path, self._tmp, self._serialize(entry))
        d.addCallback(self.wrote, path)
        d.addErrback(lambda f: self.log.warn(
            "Could not persist {what} {path}: {error}", what=self.what, path=path, error=f.getErrorMessage()))
        d.addBoth(lambda _: self._written(key))

    def _written(self, key) -> None:
        del self._writing[key]
        if key in self._unsaved:
            self._write(key)


class TagMap(EntryFiles):
    what = "tag entry"

    def __init__(self, root: str, run, index, memory: int = MEMORY, shared=None):
        """
        ``run`` is the store's thread runner; ``index`` the store's Index,
        whose limit sets the tag files' bound; ``shared`` the shared
        level's tags (regcache.sharedmeta), if any, told of every entry
        written down, so that other replicas know what this one checked.
        """
        super().__init__(root, run)
        self._index = index
        self._shared = shared
        self._memory = memory
        #: Bytes tags/ takes on disk, and its entry files (path -> bytes),
        #: least recently used first.
        self.bytes = 0
        self._files: "OrderedDict[str, int]" = OrderedDict()
        self._evicting = False

    def bound(self) -> int:
        """What tag files may take on disk now (see the module docstring)."""
        limit = self._index.limit
        return TAG_BOUND if limit is None else max(TAG_FLOOR, limit // TAG_SHARE)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: TagKey) -> bool:
        return key in self._entries

    def _dir(self, key: TagKey) -> str:
        upstream = key.upstream.replace(":", "_")
        return os.path.join(self.root, upstream, key.name, "_tags", key.tag)

    def _path(self, key: TagKey) -> str:
        return os.path.join(self._dir(key), key.accept + ".json")

    def put(self, key: TagKey, entry: TagEntry, share: bool = True) -> TagEntry:
        """
        As EntryFiles.put, and shared unless ``share`` is False (an entry
        that came from the shared level).  A check found unchanged is
        shared as often as it is written down (TOUCH_EVERY).
        """
        entry = super().put(key, entry)
        if share and self._shared is not None:
            self._shared.put_tag(key, entry)
        return entry

    def adopt(self, key: TagKey, entry: TagEntry) -> TagEntry:
        """
        Keep another replica's entry (from the shared level), unless one as
        new or newer reached memory meanwhile: that one is returned.
        """
        current = self._known(key)
        if current is not None and current.checked >= entry.checked:
            return current
        return self.put(key, entry, share=False)

    def _parse(self, data: bytes) -> TagEntry:
        return TagEntry.from_json(data)

    def _serialize(self, entry: TagEntry) -> bytes:
        return entry.to_json()

    def _remember(self, key: TagKey, entry: TagEntry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._memory:
            self._entries.popitem(last=False)

    def siblings(self, key: TagKey) -> Deferred:
        """
        A Deferred of the entries for the same tag under other accepted
        types, newest check first: what another kind of client was last
        served.  The tag's directory (63 entries at most) is read in the
        runner; memory wins over what it found.
        """
        d = self._run(_read_dir, self._dir(key))
        d.addCallback(self._gathered, key)
        return d

    def _gathered(self, found: Dict[str, bytes], key: TagKey) -> List[TagEntry]:
        entries = []
        for accept in _ALL_KEYS:
            if accept == key.accept:
                continue
            entry = self._known(TagKey(key.upstream, key.name, key.tag, accept))
            if entry is None and accept in found:
                try:
                    entry = TagEntry.from_json(found[accept])
                except ValueError:
                    continue
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: e.checked, reverse=True)

    def used(self, path: str) -> None:
        """A file under tags/ was read: last in line for eviction."""
        if path in self._files:
            self._files.move_to_end(path)

    def wrote(self, result: Tuple[int, int], path: str) -> None:
        """
        A file under tags/ was written (``write_entry``'s result): counted
        in the bound, and last in line for eviction.  The referrers cache's
        files are reported here too, so one bound covers both.
        """
        added, size = result
        self.bytes += added
        self._files[path] = size
        self._files.move_to_end(path)
        self._trim()

    def _trim(self) -> None:
        """Past the bound, delete the least recently used files (one batch at a time)."""
        if self._evicting or self.bytes <= self.bound():
            return
        writing = {self._path(k) for k in self._writing}
        candidates = [path for path in self._files if path not in writing]
        if not candidates:
            return
        self._evicting = True
        d = self._run(_evict, candidates, self.root, self.bytes - self.bound() * 3 // 4)
        d.addCallback(self._shrank)
        d.addErrback(lambda f: self.log.failure("Deleting tag entries failed", f))
        d.addBoth(lambda _: self._evicted())

    def _shrank(self, result: Tuple[int, List[str]]) -> None:
        freed, removed = result
        self.bytes -= freed
        for path in removed:
            self._files.pop(path, None)

    def _evicted(self) -> None:
        self._evicting = False
        self._trim()

    # Start-up

    def count(self) -> Deferred:
        """
        Count what the tag files take into the store's size, removing
        entries no key of this version names.  Runs once, at start-up.
        A write that lands while it runs may be counted twice (a block or
        two: the count is for eviction, which has room to spare).
        """
        d = self._run(_count, self.root)
        d.addCallback(self._counted)
        d.addErrback(lambda f: self.log.failure("Counting the tag entries failed", f))
        return d

    def _counted(self, result: Tuple[int, int, List[Tuple[str, int]]]) -> None:
        size, removed, files = result
        self.bytes += size
        # Files written meanwhile are newer than every file found.
        found = OrderedDict((path, n) for path, n in files if path not in self._files)
        found.update(self._files)
        self._files = found
        self._trim()
        if removed:
            self.log.info("Removed {removed} tag entries of an older layout", removed=removed)


# In the runner: blocking file work, which must not log (the reactor does).
# read_entry and write_entry serve every small file under tags/ (the
# referrer indexes too), so that all of them are counted the same way.


def read_entry(path: str, limit: int = 64 * 1024):
    """(at most ``limit`` bytes, or None if there is no file; a problem or None)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit), None
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, e.strerror


def _read_dir(directory: str) -> Dict[str, bytes]:
    """The key files of one tag directory, by key; unreadable ones left out."""
    found: Dict[str, bytes] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        if name in _KEY_FILES:
            data, _ = read_entry(os.path.join(directory, name))
            if data is not None:
                found[_KEY_FILES[name]] = data
    return found


def write_entry(directory: str, path: str, tmp_dir: str, data: bytes) -> Tuple[int, int]:
    """Write one entry; returns how many bytes tags/ grew by on disk, and what the file takes."""
    added = _make_dirs(directory)
    try:
        old = _blocks(os.path.getsize(path))
    except FileNotFoundError:
        old = 0
    tmp = os.path.join(tmp_dir, f"tag.{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return added + _blocks(len(data)) - old, _blocks(len(data))


def _make_dirs(directory: str) -> int:
    """Create ``directory`` and what it lacks above it; returns the blocks they take."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    made = 0
    for d in reversed(missing):
        try:
            os.mkdir(d)
            made += 1
        except FileExistsError:
            pass  # another write made it: that one counts it
    return BLOCK * made


def _blocks(size: int) -> int:
    return max(1, -(-size // BLOCK)) * BLOCK


def _count(root: str) -> Tuple[int, int, List[Tuple[str, int]]]:
    """
    (bytes on disk, entries removed, entry files as (path, bytes) least
    recently written first) of everything under ``root``.  Below a
    ``_tags`` directory come tag directories, and in those key files only:
    anything else is left by an older layout; below ``_referrers``, the
    referrers cache's index files.  A repository name cannot contain
    ``_tags`` or ``_referrers``, so nothing else is mistaken for one.
    """
    size = removed = 0
    files: List[Tuple[float, str, int]] = []
    for directory, dirs, names in os.walk(root):
        parent = os.path.basename(os.path.dirname(directory))
        in_tag_dir = parent == "_tags" and TAG_RE.fullmatch(os.path.basename(directory))
        in_referrers_dir = parent == "_referrers"
        if in_tag_dir:
            for d in dirs:
                removed += _remove_tree(os.path.join(directory, d))
            dirs[:] = []
        for name in names:
            path = os.path.join(directory, name)
            if in_tag_dir and name not in _KEY_FILES:
                removed += _remove(path)
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            size += _blocks(st.st_size)
            if in_tag_dir or in_referrers_dir:
                files.append((st.st_mtime, path, _blocks(st.st_size)))
        size += BLOCK * len(dirs)
    files.sort()
    return size, removed, [(path, n) for _, path, n in files]


def _evict(paths: List[str], root: str, need: int) -> Tuple[int, List[str]]:
    """
    Delete entry files in order, with the directories they leave empty
    below ``root``, until ``need`` bytes are freed; returns (bytes freed,
    paths gone).  Freed bytes are only known as directories empty, hence
    here and not chosen on the reactor.
    """
    freed = 0
    gone: List[str] = []
    for path in paths:
        if freed >= need:
            break
        gone.append(path)
        try:
            n = _blocks(os.path.getsize(path))
            os.unlink(path)
            freed += n
        except FileNotFoundError:
            continue
        directory = os.path.dirname(path)
        while directory != root and directory.startswith(root):
            try:
                os.rmdir(directory)
            except OSError:
                break
            freed += BLOCK
            directory = os.path.dirname(directory)
    return freed, gone


def _remove(path: str) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0


def _remove_tree(path: str) -> int:
    removed = sum(len(names) for _, _, names in os.walk(path))
    shutil.rmtree(path, ignore_errors=True)
    return removed
