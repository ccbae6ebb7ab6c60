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

With ``--storage-backend s3`` (on the command line, in the environment or
in ``--config``'s storage section, as the server takes it) the shared
bucket is checked too, after the local level (regcache.verify_bucket);
without it the output says that only the local level was checked.  A
replica whose local level is empty or gone can check the bucket alone.
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
    parser.add_argument("--config", help="the server's config file, for its storage section")
    for option in _BUCKET_OPTIONS:
        parser.add_argument(f"--{option}", help="as the server takes it: the shared level's bucket")
    args = parser.parse_args(list(argv))
    environ = os.environ if environ is None else environ
    given = {"storage": args.storage, "config": args.config,
             **{option: getattr(args, option.replace("-", "_")) for option in _BUCKET_OPTIONS}}
    try:
        config = settings.load(given, environ)
    except settings.ConfigError as e:
        out.write(f"regcache verify: {e}\n")
        return 2
    root = config.storage
    code = 0
    if os.path.isdir(os.path.join(root, "blobs")):
        code = 1 if verify(root, out, args.jobs).problems else 0
    elif config.shared is None:
        out.write(f"regcache verify: no store at {root}\n")
        return 2
    else:
        out.write(f"no local store at {root}: checking the bucket only\n")
    if config.shared is None:
        out.write("checked the local level only: the storage backend is local (no bucket to check)\n")
        return code
    return max(code, _verify_bucket(config.shared.bucket, out, args.jobs))


#: The server's options that say where the bucket is and how to reach it.
_BUCKET_OPTIONS = ("storage-backend", "s3-endpoint", "s3-bucket", "s3-region", "s3-prefix", "s3-access-key",
                   "s3-secret-key-file")


def _verify_bucket(bucket_settings, out: TextIO, jobs: int) -> int:
    """
    Check the bucket in a reactor of its own (the command runs once and
    exits): 0 clean, 1 bad objects found (and deleted), 2 when it could not
    be listed.
    """
    from twisted.internet import task
    from twisted.internet.defer import Deferred
    from twisted.internet.threads import deferToThread

    from regcache import upstream_http
    from regcache.s3 import S3, StorageError
    from regcache.verify_bucket import BucketCheck

    codes = []

    async def check(reactor) -> None:
        bucket = S3(bucket_settings, upstream_http.client(reactor, 5.0), reactor, deferToThread)
        try:
            report = await BucketCheck(bucket, out, reactor, jobs).run()
        except StorageError as e:
            out.write(f"regcache verify: cannot list the bucket {bucket_settings.bucket}: {e}\n")
            codes.append(2)
            return
        codes.append(1 if report.problems else 0)

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(check(reactor)))
    except SystemExit:
        pass  # react's way to end; the result is in ``codes``
    return codes[0] if codes else 2
