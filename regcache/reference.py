# test-case-name: tests.test_reference
"""
The grammar of repository names, tags and digests, checked before anything
touches the disk or the upstream.

A name or digest ends up in a file path and an upstream URL, so the checks are
strict: a string that does not fit the grammar is refused, never normalised
into something that might.  A refusal is an InvalidReference, which says
what kind of reference was wrong and knows no HTTP: the routes answer it as
a 400 with the OCI code for its kind, and code that parses stored or
upstream data catches it as bad data.
"""

import hashlib
import re
from dataclasses import dataclass

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_HEX_RE = re.compile(r"[a-f0-9]+")

MAX_NAME = 255

#: The algorithms regcache can verify, and the length of their hex form.
ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}

class InvalidReference(ValueError):
    """
    A string that is not a reference of ``kind``, and why, in words fit for
    the person who sent it.  The kind is "name", "tag", "digest", or
    "algorithm" for a well-formed digest regcache cannot verify.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"InvalidReference({self.kind!r}, {self.message!r})"


def check_name(name: str) -> str:
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise InvalidReference("name", f"invalid repository name: {name[:300]!r}")
    return name


def check_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise InvalidReference("tag", f"invalid tag: {tag[:200]!r}")
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
            raise InvalidReference("digest", f"invalid digest: {text[:200]!r}")
        algorithm, encoded = m.groups()
        if algorithm not in ALGORITHMS:
            # Well-formed but unverifiable: refusing is safer than caching
            # bytes nobody checked.
            raise InvalidReference(
                "algorithm",
                f"digest algorithm {algorithm[:50]!r} is not supported (regcache verifies {', '.join(ALGORITHMS)})",
            )
        if len(encoded) != ALGORITHMS[algorithm] or not _HEX_RE.fullmatch(encoded):
            raise InvalidReference("digest", f"invalid {algorithm} digest: {text[:200]!r}")
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> "Digest":
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def is_digest(reference: str) -> bool:
    return ":" in reference

