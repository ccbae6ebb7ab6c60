# test-case-name: tests.test_manifests
"""
What a manifest is, whoever fetched or keeps it: the value, the media types
regcache serves, and what its bytes declare and reference.

The upstream client builds manifests, the store keeps them, the mirror and
the tag maps decide by their types; none of them owns the others' idea of
a manifest, so it lives here.  Nothing here does I/O.
"""

import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

from regcache.reference import Digest, InvalidReference

#: Larger is no manifest: neither read from upstream nor from the disk.
MAX_MANIFEST = 4 * 1024 * 1024

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

#: Every manifest media type regcache serves, in the fixed order accept
#: keys are made in (and that upstream is asked with): tag files are named
#: by positions in it, so it only ever grows at the end.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    OCI_INDEX,
    SCHEMA1,
    SCHEMA1_SIGNED,
)


@dataclass(frozen=True)
class Manifest:
    body: bytes
    media_type: str
    digest: Digest

    @property
    def size(self) -> int:
        return len(self.body)


def _document(body: bytes) -> Optional[dict]:
    """The JSON object ``body`` holds, or None for anything else."""
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def sniffed_type(body: bytes) -> str:
    """
    The type of a manifest upstream sent without a Content-Type: the one its
    body names, else schema1's, which is what an untyped manifest most
    likely is (containerd maps text/plain to it).
    """
    value = (_document(body) or {}).get("mediaType")
    if isinstance(value, str) and value:
        return value
    return SCHEMA1_SIGNED


def declared_type(body: bytes) -> Optional[str]:
    """
    The manifest media type ``body`` declares: its ``mediaType``, or schema1
    (signed or not) by ``schemaVersion``, as containerd reads a manifest
    sent as ``text/plain``.  None if it declares no type regcache serves.
    """
    doc = _document(body)
    if doc is None:
        return None
    declared = doc.get("mediaType")
    if declared is None and doc.get("schemaVersion") == 1:
        declared = SCHEMA1_SIGNED if "signatures" in doc else SCHEMA1
    return declared if declared in MANIFEST_MEDIA_TYPES else None


def check_index(body: bytes) -> None:
    """
    Raise ValueError unless ``body`` is an OCI image index, as a referrers
    answer must be: schemaVersion 2, no other mediaType, and a list of
    descriptors, each with a media type, a digest and a size.  regcache
    serves these bytes as they came, so they are checked before they are.
    """
    doc = _document(body)
    if doc is None or doc.get("schemaVersion") != 2 or doc.get("mediaType", OCI_INDEX) != OCI_INDEX:
        raise ValueError("not an OCI image index")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise ValueError("an image index without a list of manifests")
    for desc in manifests:
        if not isinstance(desc, dict) or not isinstance(desc.get("mediaType"), str):
            raise ValueError("an image index entry without a media type")
        size = desc.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("an image index entry without a size")
        try:
            Digest.parse(str(desc.get("digest", "")))
        except InvalidReference as e:
            raise ValueError(f"an image index entry with an {e.message}") from None


def references(body: bytes) -> Iterator[Tuple[Digest, Optional[int]]]:
    """
    The (digest, declared size) of every descriptor a manifest or index
    names: config, layers, child manifests.  Anything unparsable names
    nothing (the bytes matched their digest; they are simply not a manifest
    regcache understands).
    """
    doc = _document(body)
    if doc is None:
        return
    descriptors = []
    if isinstance(doc.get("config"), dict):
        descriptors.append(doc["config"])
    for key in ("layers", "manifests", "blobs"):
        if isinstance(doc.get(key), list):
            descriptors.extend(x for x in doc[key] if isinstance(x, dict))
    for desc in descriptors:
        try:
            digest = Digest.parse(str(desc.get("digest", "")))
        except InvalidReference:
            continue
        size = desc.get("size")
        yield digest, size if isinstance(size, int) and size >= 0 else None
