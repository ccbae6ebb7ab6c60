# test-case-name: tests.test_reference
"""
The grammar of repository names, tags and digests, checked before anything
touches the disk or the upstream.

A name or digest ends up in a file path and an upstream URL, so the checks are
strict: a request that does not fit the grammar is refused with a 400, never
normalised into something that might.
"""

import hashlib
import re
from dataclasses import dataclass

from regcache.errors import RegistryError

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")

MAX_NAME = 255

#: The algorithms regcache can verify, and the length of their hex form.
ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}


def check_name(name: str) -> str:
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise RegistryError("NAME_INVALID", f"invalid repository name: {name[:300]!r}")
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise RegistryError("TAG_INVALID", f"invalid tag: {tag[:200]!r}")
    return tag


@dataclass(frozen=True)
class Digest:
    """
    A verified-to-be-well-formed digest of an algorithm regcache can compute.
    """

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self):
        return hashlib.new(self.algorithm)

    @classmethod
    def parse(cls, text: str) -> "Digest":
        m = DIGEST_RE.fullmatch(text)
        if not m:
            raise RegistryError("DIGEST_INVALID", f"invalid digest: {text[:200]!r}")
        algorithm, encoded = m.groups()
        if algorithm not in ALGORITHMS:
            # Well-formed but unverifiable: refusing is safer than caching
            # bytes nobody checked.  A 400 DIGEST_INVALID, as distribution
            # answers: the request is fine but for its digest.
            raise RegistryError(
                "DIGEST_INVALID",
                f"digest algorithm {algorithm[:50]!r} is not supported (regcache verifies {', '.join(ALGORITHMS)})",
            )
        if len(encoded) != ALGORITHMS[algorithm] or not re.fullmatch("[a-f0-9]+", encoded):
            raise RegistryError("DIGEST_INVALID", f"invalid {algorithm} digest: {text[:200]!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> "Digest":
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def is_digest(reference: str) -> bool:
    return ":" in reference


def split_path(path: str):
    """
    Split what follows ``/v2/`` into (name, kind, rest), routing on the last
    ``/manifests/``, ``/blobs/`` or ``/tags/list`` so that a name may itself
    contain those words as components.  Returns None for no match.
    """
    if path.endswith("/tags/list"):
        return path[: -len("/tags/list")], "tags", ""
    best = None
    for kind in ("manifests", "blobs"):
        i = path.rfind(f"/{kind}/")
        if i > 0 and (best is None or i > best[0]):
            best = (i, kind)
    if best is None:
        return None
    i, kind = best
    return path[:i], kind, path[i + len(kind) + 2 :]
