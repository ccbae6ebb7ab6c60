# test-case-name: tests.test_prefetch,tests.integration.test_prefetch_proc
"""
``regcache prefetch IMAGE...``: warm a running regcache over HTTP, so that
CI pulls in a rate-limit window find their base images already cached.

It asks the mirror what a client pulling the image would ask: the tag's
manifest (an index, for a multi-arch image), the manifest of each chosen
platform, and every blob they name.  regcache fetches, verifies and stores
all of it on its normal path; nothing here touches the store, so a warm-up
can never put anything in the cache that a pull would not.  Bodies are
read and thrown away in 1 MiB reads, and every blob is hashed as it
streams: a second check, here, of what the mirror serves.

Each answer's ``X-Cache`` header says whether regcache already held it,
which is how the report tells what was fetched from what was cached; a
second run is all "cached" and costs upstream a HEAD per tag at most.

This is a command, not the server: blocking I/O is fine here, but every
request has a timeout, a failed or 5xx answer is retried a few times, and
a few blobs at a time are fetched in threads.  One image failing does not
stop the others; it makes the exit status 1.
"""

import argparse
import base64
import http.client
import json
import os
import re
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, TextIO
from urllib.parse import quote

from regcache.reference import Digest, InvalidReference, check_name, check_tag
from regcache.store import MAX_MANIFEST

DEFAULT_MIRROR = "http://127.0.0.1:5000"

#: The manifest types a pull walks: indexes name manifests, manifests blobs.
INDEX_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
IMAGE_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)

#: Answers regcache gave from what it held (``stale``: upstream failed and
#: the cached tag was served): everything else came from upstream now.
CACHED = ("hit", "revalidated", "stale")

CHUNK = 1024 * 1024
BLOB_JOBS = 4
#: Seconds any one read or connect may take; a blob as big as it likes may
#: take as long as it keeps coming.
TIMEOUT = 60.0
ATTEMPTS = 3

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")


class Failed(Exception):
    """One image (or one of its parts) could not be warmed, and why, in words."""


class Retryable(Failed):
    """A failure another attempt may not see: a 5xx, a dropped connection, a timeout."""


@dataclass(frozen=True)
class ImageRef:
    """An image reference as docker reads it: registry, repository, tag, digest."""

    registry: str
    name: str
    tag: Optional[str]
    digest: Optional[str]

    @property
    def reference(self) -> str:
        """What the manifest is asked by: the digest wins over a tag, as docker pulls it."""
        return self.digest or self.tag

    def __str__(self) -> str:
        text = f"{self.registry}/{self.name}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image(text: str) -> ImageRef:
    """
    Parse ``text`` as docker does: a first component with a dot or a
    colon, or ``localhost``, is a registry, else the image is Docker Hub's;
    a one-component Hub name is under ``library/``; no tag and no digest
    means ``latest``.
    """
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        try:
            Digest.parse(digest)
        except InvalidReference as e:
            raise Failed(f"{text}: {e}")
    registry, slash, path = rest.partition("/")
    if not slash or not ("." in registry or ":" in registry or registry == "localhost"):
        registry, path = DOCKER_HUB, rest
    if registry in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
    name, tag = path, None
    colon = path.rfind(":")
    if colon > path.rfind("/"):
        name, tag = path[:colon], path[colon + 1:]
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    if tag is None and digest is None:
        tag = "latest"
    try:
        check_name(name)
        if tag is not None:
            check_tag(tag)
    except InvalidReference as e:
        raise Failed(f"{text}: {e}")
    return ImageRef(registry, name, tag, digest)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
            raise ValueError(f"not a platform (os/arch[/variant]): {text.strip()!r}")
        return cls(*parts)

    def matches(self, platform: dict) -> bool:
        """
        Whether an index entry's ``platform`` is this one.  Without a
        variant any variant matches; arm64 with none is arm64/v8, as
        containerd reads it.
        """
        if (platform.get("os"), platform.get("architecture")) != (self.os, self.architecture):
            return False
        if self.variant is None:
            return True
        variant = platform.get("variant") or ("v8" if self.architecture == "arm64" else None)
        return variant == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse_platforms(text: str) -> Optional[List[Platform]]:
    """``linux/amd64,linux/arm64`` as a list; ``all`` as None, meaning every manifest of an index."""
    if text.strip() == "all":
        return None
    return [Platform.parse(p) for p in text.split(",") if p.strip()]


def select(index: dict, platforms: Optional[List[Platform]]) -> List[dict]:
    """
    The descriptors of ``index`` to fetch: all of them, or those of the
    platforms asked for.  An index with none of them is a failure: the
    warm-up would have warmed nothing a pull of those platforms needs.
    """
    entries = descriptors(index.get("manifests") or [])
    if platforms is None:
        return list(entries)
    chosen = [d for d in entries if any(p.matches(d.get("platform") or {}) for p in platforms)]
    if not chosen:
        offered = ", ".join(str(Platform(**_platform_fields(d))) for d in entries) or "none"
        raise Failed(f"no manifest for {', '.join(map(str, platforms))} (the index has: {offered})")
    return chosen


def _platform_fields(descriptor: dict) -> dict:
    p = descriptor.get("platform") or {}
    return {"os": p.get("os", "?"), "architecture": p.get("architecture", "?"), "variant": p.get("variant")}


def blobs_of(manifest: dict) -> List[dict]:
    """The blobs an image manifest names: its config, then its layers."""
    return descriptors([manifest.get("config")]) + descriptors(manifest.get("layers") or [])


def descriptors(entries) -> List[dict]:
    """
    ``entries`` as descriptors, each an object with a digest (a string; the
    grammar checks it before use): anything else fails the image here,
    instead of somewhere deeper.
    """
    if not isinstance(entries, list) or not all(isinstance(d, dict) and isinstance(d.get("digest"), str)
                                                for d in entries):
        raise Failed("a manifest lists something that is not a descriptor")
    return entries


@dataclass
class Counts:
    fetched: int = 0
    cached: int = 0
    failed: int = 0


@dataclass
class Tally:
    """What a run did, updated from the blob threads too, hence the lock."""

    images: int = 0
    images_failed: List[str] = field(default_factory=list)
    manifests: Counts = field(default_factory=Counts)
    blobs: Counts = field(default_factory=Counts)
    bytes_fetched: int = 0
    bytes_cached: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, counts: Counts, outcome: Optional[str], size: int = 0) -> None:
        with self.lock:
            if outcome is None:
                counts.failed += 1
            elif outcome in CACHED:
                counts.cached += 1
                self.bytes_cached += size
            else:
                counts.fetched += 1
                self.bytes_fetched += size

    def summary(self) -> str:
        m, b = self.manifests, self.blobs
        failed = f" ({len(self.images_failed)} failed)" if self.images_failed else ""
        return (
            f"prefetch: {self.images} images{failed}; "
            f"manifests: {m.fetched} fetched, {m.cached} cached, {m.failed} failed; "
            f"blobs: {b.fetched} fetched, {b.cached} cached, {b.failed} failed; "
            f"{size_text(self.bytes_fetched)} fetched, {size_text(self.bytes_cached)} already cached; "
            "every blob's digest checked here as it streamed"
        )


def size_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.1f} {units[0]}"


class MirrorClient:
    """
    GETs against the mirror, each with a timeout and a few attempts.  Every
    request names the image's registry in ``?ns=``, as containerd does, so
    the mirror serves it from the upstream for that registry.
    """

    def __init__(self, mirror: str, creds: Optional[str] = None, timeout: float = TIMEOUT):
        self.mirror = mirror.rstrip("/")
        self.timeout = timeout
        self.headers = {"User-Agent": "regcache-prefetch"}
        if creds:
            self.headers["Authorization"] = "Basic " + base64.b64encode(creds.encode("utf-8")).decode("ascii")

    def url(self, image: ImageRef, kind: str, reference: str) -> str:
        return f"{self.mirror}/v2/{image.name}/{kind}/{reference}?ns={quote(image.registry, safe='')}"

    def retrying(self, what: str, attempt):
        """``attempt()``'s result, trying again while it fails in a way that may pass."""
        for i in range(ATTEMPTS):
            try:
                return attempt()
            except Retryable as e:
                if i == ATTEMPTS - 1:
                    raise Failed(f"{what}: {e} ({ATTEMPTS} attempts)")
            except Failed as e:
                raise Failed(f"{what}: {e}")

    def open(self, url: str, accept: Sequence[str] = ()):
        headers = dict(self.headers)
        if accept:
            headers["Accept"] = ", ".join(accept)
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as e:
            with e:
                why = f"{e.code} {_error_message(e.read(64 * 1024))}".rstrip()
            raise (Retryable if e.code >= 500 else Failed)(why)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise Retryable(str(getattr(e, "reason", e)))

    def manifest(self, image: ImageRef, reference: str):
        """(digest, media type, parsed body, X-Cache) of one manifest, its digest checked."""
        def attempt():
            with self.open(self.url(image, "manifests", reference), INDEX_TYPES + IMAGE_TYPES) as r:
                try:
                    body = r.read(MAX_MANIFEST + 1)
                except (OSError, http.client.HTTPException) as e:
                    raise Retryable(f"reading the manifest: {e}")
                return body, r.headers.get("Docker-Content-Digest"), r.headers.get_content_type(), \
                    r.headers.get("X-Cache")

        what = f"manifest {reference}"
        if reference != image.tag:
            # A digest read from an index goes into a URL: the grammar first.
            _hasher(reference, what)
        body, named, media_type, cache = self.retrying(what, attempt)
        if len(body) > MAX_MANIFEST:
            raise Failed(f"{what}: larger than {MAX_MANIFEST} bytes")
        digest = reference if ":" in reference else named
        if not digest:
            raise Failed(f"{what}: the mirror named no Docker-Content-Digest")
        h = _hasher(digest, what)
        h.update(body)
        if h.hexdigest() != _hex(digest):
            raise Failed(f"{what}: the body does not match {digest}")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise Failed(f"{what}: not a JSON object")
        return digest, doc.get("mediaType") or media_type, doc, cache

    def blob(self, image: ImageRef, descriptor: dict, progress) -> str:
        """
        Stream one blob to nowhere, hashing it, and return its X-Cache.
        ``progress(n)`` hears of every chunk, and of its undoing when an
        attempt fails part-way and the blob is read again.
        """
        digest, size = descriptor.get("digest", ""), descriptor.get("size")
        what = f"blob {digest}"
        # Checked before it goes into a URL, and the hasher for every attempt.
        _hasher(digest, what)

        def attempt():
            h = Digest.parse(digest).hasher()
            seen = 0
            try:
                with self.open(self.url(image, "blobs", digest)) as r:
                    while True:
                        chunk = r.read(CHUNK)
                        if not chunk:
                            break
                        h.update(chunk)
                        seen += len(chunk)
                        progress(len(chunk))
                    cache = r.headers.get("X-Cache")
            except (OSError, http.client.HTTPException) as e:
                progress(-seen)
                raise Retryable(f"cut off after {seen} bytes: {e}")
            except Failed:
                progress(-seen)
                raise
            if h.hexdigest() != _hex(digest) or (isinstance(size, int) and seen != size):
                progress(-seen)
                raise Failed(f"got {seen} bytes that do not match the digest and size {size}")
            return cache

        return self.retrying(what, attempt)


def _hasher(digest: str, what: str):
    """A hasher for ``digest``, refusing one regcache's grammar refuses."""
    if not isinstance(digest, str):
        raise Failed(f"{what}: not a digest: {digest!r}")
    try:
        return Digest.parse(digest).hasher()
    except InvalidReference as e:
        raise Failed(f"{what}: {e}")


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _error_message(body: bytes) -> str:
    """The first OCI error's message from an error body, if it has one."""
    try:
        return json.loads(body)["errors"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""


class Plain:
    """One line per manifest, blob and image: what a log or a pipe wants."""

    def __init__(self, out: TextIO):
        self.out = out
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def item(self, image: str, kind: str, digest: str, size: Optional[int], outcome: str) -> None:
        sized = f" ({size_text(size)})" if size is not None else ""
        self.line(f"{image}: {kind} {digest}{sized} {outcome}")

    def expect(self, size: int) -> None:
        """``size`` more bytes are to come."""

    def advance(self, n: int) -> None:
        """``n`` bytes came (or, negative, are to come again)."""

    def close(self) -> None:
        """The run is over."""


class Bar(Plain):
    """
    On a terminal: one bar for the bytes of every blob, and a line above it
    per image; single manifests and blobs only change the bar's caption.
    """

    def __init__(self, out: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        super().__init__(out)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), console=Console(file=out), transient=True,
        )
        self.task = self.progress.add_task("prefetch", total=0)
        self.progress.start()

    def line(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def item(self, image: str, kind: str, digest: str, size: Optional[int], outcome: str) -> None:
        self.progress.update(self.task, description=f"{image} {kind} {digest[:19]} {outcome}")

    def expect(self, size: int) -> None:
        with self.lock:
            self.progress.update(self.task, total=self.progress.tasks[0].total + size)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def close(self) -> None:
        self.progress.stop()


def outcome_word(cache: Optional[str]) -> str:
    """How the report names an X-Cache value."""
    if cache in CACHED:
        return f"cached ({cache})"
    return f"fetched ({cache})" if cache else "fetched"


class Prefetch:
    """
    Warms image after image.  Blobs go to a few threads; one named by
    several images is fetched once, and its outcome shared.
    """

    #: Indexes within indexes, at most: deeper is no image anyone pulls.
    MAX_DEPTH = 3

    def __init__(self, client: MirrorClient, platforms: Optional[List[Platform]], report: Plain,
                 jobs: int = BLOB_JOBS):
        self.client = client
        self.platforms = platforms
        self.report = report
        self.tally = Tally()
        self.pool = ThreadPoolExecutor(jobs, thread_name_prefix="prefetch")
        self.blobs: Dict[str, Future] = {}

    def run(self, texts: Sequence[str]) -> Tally:
        try:
            for text in texts:
                self.image(text)
        finally:
            self.pool.shutdown(wait=True)
        return self.tally

    def image(self, text: str) -> None:
        self.tally.images += 1
        try:
            image = parse_image(text)
            futures = [self.blob(image, d) for d in self.walk(image, image.reference, 0)]
            errors = [e for e in (f.exception() for f in futures) if e is not None]
            for e in errors:
                if not isinstance(e, Failed):
                    raise e
            if errors:
                more = f" and {len(errors) - 1} more" if len(errors) > 1 else ""
                raise Failed(f"{errors[0]}{more}")
        except Failed as e:
            self.tally.images_failed.append(text)
            self.report.line(f"{text}: FAILED: {e}")
        else:
            self.report.line(f"{text}: done")

    def walk(self, image: ImageRef, reference: str, depth: int) -> List[dict]:
        """The blob descriptors of the manifest ``reference`` and of the platforms' manifests it names."""
        try:
            digest, media_type, doc, cache = self.client.manifest(image, reference)
        except Failed:
            self.tally.count(self.tally.manifests, None)
            raise
        self.tally.count(self.tally.manifests, cache)
        self.report.item(str(image), "manifest", digest, None, outcome_word(cache))
        if media_type in IMAGE_TYPES:
            return blobs_of(doc)
        if media_type in INDEX_TYPES and depth < self.MAX_DEPTH:
            return [b for child in select(doc, self.platforms) for b in self.walk(image, child.get("digest"), depth + 1)]
        raise Failed(f"manifest {digest} is a {media_type} manifest, which prefetch does not walk")

    def blob(self, image: ImageRef, descriptor: dict) -> Future:
        digest = descriptor.get("digest")
        with self.tally.lock:
            future = self.blobs.get(digest)
            if future is not None:
                return future
            size = descriptor.get("size")
            self.report.expect(size if isinstance(size, int) else 0)
            future = self.blobs[digest] = self.pool.submit(self.fetch_blob, image, descriptor)
        return future

    def fetch_blob(self, image: ImageRef, descriptor: dict) -> None:
        digest, size = descriptor.get("digest"), descriptor.get("size")
        try:
            cache = self.client.blob(image, descriptor, self.report.advance)
        except Failed as e:
            self.tally.count(self.tally.blobs, None)
            self.report.line(f"{image}: blob {digest} FAILED: {e}")
            raise
        self.tally.count(self.tally.blobs, cache, size if isinstance(size, int) else 0)
        self.report.item(str(image), "blob", digest, size, outcome_word(cache))


def read_list(path: str) -> List[str]:
    """The images a ``--from-file`` names: one a line, blank lines and ``#`` comments skipped."""
    with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None, environ=None) -> int:
    out = out or sys.stdout
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="regcache prefetch",
        description="Warm a running regcache: pull each image's manifests and blobs through it, so that "
                    "later pulls are served from its cache. Exit status 1 if anything failed.",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="alpine:3.20, ghcr.io/owner/app:v1, name@sha256:...")
    parser.add_argument("--from-file", action="append", default=[], metavar="FILE",
                        help="also read images from FILE, one a line (# starts a comment; - is stdin)")
    parser.add_argument("--platform", default="all",
                        help="os/arch[/variant],... of a multi-arch image to fetch (default: all)")
    parser.add_argument("--mirror", default=environ.get("REGCACHE_MIRROR") or DEFAULT_MIRROR,
                        help=f"the regcache to warm [REGCACHE_MIRROR] (default: {DEFAULT_MIRROR})")
    parser.add_argument("--creds", metavar="USER:PASSWORD", help="sent to the mirror as Basic auth")
    args = parser.parse_args(argv)
    try:
        platforms = parse_platforms(args.platform)
    except ValueError as e:
        parser.error(f"--platform: {e}")
    if not re.match(r"https?://[^/]+", args.mirror):
        parser.error(f"--mirror: not an http(s) URL: {args.mirror!r}")
    if args.creds is not None and ":" not in args.creds:
        parser.error("--creds: expected USER:PASSWORD")
    images = list(args.images)
    try:
        for path in args.from_file:
            images += read_list(path)
    except OSError as e:
        parser.error(f"--from-file: {e}")
    if not images:
        parser.error("no images: name some, or --from-file")
    report = Bar(out) if out.isatty() else Plain(out)
    try:
        tally = Prefetch(MirrorClient(args.mirror, args.creds), platforms, report).run(images)
    finally:
        report.close()
    Plain(out).line(tally.summary())
    return 1 if tally.images_failed else 0
