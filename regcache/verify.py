# test-case-name: tests.test_verify
"""
``regcache verify --storage DIR``: re-hash the whole store, remove what does
not match its name, and exit non-zero if anything was wrong.

The server never rehashes at start (that would make start-up as slow as the
disk), and a file under ``blobs/`` was verified when it landed; this command
is for the cases that promise cannot cover: a disk that rots, a hand edit, a
restore from a backup.  It is safe to run beside a live server, which treats
a file that vanished as a miss and fetches it again (a manifest it holds in
memory too: that copy is served only while its file is unchanged), and
whose good copy stored meanwhile under a bad file's name is left alone.

Hashing streams each file in 1 MiB reads, a few files at a time in threads
(hashlib releases the GIL), so memory stays bounded however big the store.

What is removed, and why:

- a blob or manifest whose bytes do not match its digest;
- with a bad manifest, its type record and the tag entries that name it, so
  no tag points at a manifest that is gone (the mirror would refetch it
  anyway: this only saves the round trip to find out);
- with any bad file, its links (regcache.links): a new copy is linked anew;
- a file under ``blobs/`` or ``links/`` whose name is no digest, a type
  record with no body and links with no content: none can be served.

The links of good content are kept: they say which repositories may be
served it, and losing them would cost a confirmation upstream per
repository.
"""

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set, TextIO, Tuple

from regcache import config as settings
from regcache.reference import Digest
from regcache.store import Store

CHUNK = 1024 * 1024


@dataclass
class Report:
    checked: int = 0
    bytes: int = 0
    corrupt: List[str] = field(default_factory=list)
    strays: List[str] = field(default_factory=list)
    records: List[str] = field(default_factory=list)
    links: List[str] = field(default_factory=list)
    tags: List[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.corrupt) + len(self.strays) + len(self.records) + len(self.links)


def hash_file(path: str, digest: Digest) -> Optional[Tuple[bool, int]]:
    """
    Whether the file's bytes match ``digest``, and the inode that was read;
    None if it vanished (evicted by a live server meanwhile).
    """
    h = digest.hasher()
    try:
        with open(path, "rb", buffering=0) as f:
            inode = os.fstat(f.fileno()).st_ino
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
    except FileNotFoundError:
        return None
    return h.hexdigest() == digest.hex, inode


def verify(root: str, out: TextIO, jobs: int = 2) -> Report:
    """
    Check and clean the store under ``root``, writing one line per problem
    to ``out``.
    """
    store = Store(root, run=None, now=lambda: 0.0)
    report = Report()
    files = []
    for digest, entry in store.walk("blobs"):
        if digest is None:
            report.strays.append(entry.path)
            out.write(f"stray file, not a digest: {entry.path}\n")
            _remove(entry.path)
        else:
            files.append((digest, entry.path))
    bad: Set[Digest] = set()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for (digest, path), hashed in zip(files, pool.map(lambda f: hash_file(f[1], f[0]), files)):
            if hashed is None:
                continue
            ok, inode = hashed
            report.checked += 1
            try:
                report.bytes += os.path.getsize(path)
            except FileNotFoundError:
                pass
            if not ok:
                bad.add(digest)
                report.corrupt.append(str(digest))
                out.write(f"corrupt: {digest} ({path})\n")
                _remove(path, inode)
    for digest, entry in store.walk("manifests"):
        # A record goes only with its body: a corrupt body that a live
        # server replaced meanwhile is a good manifest again.
        if digest is None or not os.path.exists(store.blob_path(digest)):
            if digest not in bad:
                report.records.append(entry.path)
                out.write(f"type record without a manifest: {entry.path}\n")
            _remove(entry.path)
    for digest, entry in store.walk("links"):
        if digest is None:
            report.strays.append(entry.path)
            out.write(f"stray file, not a digest: {entry.path}\n")
            _remove(entry.path)
        elif not os.path.exists(store.blob_path(digest)):
            # As for records: a live server writes links only beside data.
            if digest not in bad:
                report.links.append(entry.path)
                out.write(f"links without content: {entry.path}\n")
            _remove(entry.path)
    if bad:
        _drop_tags(os.path.join(root, "tags"), {str(d) for d in bad}, report, out)
    out.write(
        f"checked {report.checked} files, {report.bytes} bytes: {len(report.corrupt)} corrupt, "
        f"{len(report.strays)} stray, {len(report.records)} orphan type records, "
        f"{len(report.links)} orphan links files, "
        f"{len(report.tags)} tag entries dropped\n"
    )
    return report


def _drop_tags(tags_root: str, bad: Set[str], report: Report, out: TextIO) -> None:
    for dirpath, _, names in os.walk(tags_root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    digest = json.load(f).get("digest")
            except (OSError, ValueError, AttributeError):
                continue
            if digest in bad:
                report.tags.append(path)
                out.write(f"tag entry names a corrupt manifest: {path}\n")
                _remove(path)


def _remove(path: str, inode: Optional[int] = None) -> None:
    """
    Remove ``path``; given ``inode``, only if it is still that file: a live
    server may have put a good copy in its place since it was read.
    """
    try:
        if inode is None or os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def main(argv: Sequence[str], environ=None, out: TextIO = sys.stdout) -> int:
    """
    The ``verify`` command: 0 when the store was clean, 1 when something
    was removed, 2 when the store could not be checked.
    """
    parser = argparse.ArgumentParser(prog="regcache verify", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--storage", help="cache directory (default: as the server: "
                        "REGCACHE_STORAGE, or /var/lib/regcache as root)")
    parser.add_argument("--jobs", type=int, default=2, help="files hashed at once (default 2)")
    args = parser.parse_args(list(argv))
    environ = os.environ if environ is None else environ
    try:
        root = settings.load({"storage": args.storage}, environ).storage
    except settings.ConfigError as e:
        out.write(f"regcache verify: {e}\n")
        return 2
    if not os.path.isdir(os.path.join(root, "blobs")):
        out.write(f"regcache verify: no store at {root}\n")
        return 2
    report = verify(root, out, args.jobs)
    return 1 if report.problems else 0
