# test-case-name: tests.test_manifests
"""
What a manifest is, apart from where it is kept or fetched: its media
types, what its bytes declare and name, and the layering that keeps it
neutral (the upstream client knows no store; the value knows no I/O).
"""

import ast
import importlib
import json

import pytest

from regcache.manifests import (
    MANIFEST_MEDIA_TYPES, SCHEMA1, SCHEMA1_SIGNED, Manifest, declared_type, references, sniffed_type,
)
from regcache.reference import Digest

HEX = "a" * 64


def imports_of(module: str):
    """Every module ``module``'s source imports, at any depth in it."""
    path = importlib.import_module(module).__file__
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module)
    return found


def test_the_upstream_client_knows_no_store():
    """upstream.py builds manifests from the neutral module and imports nothing of the store."""
    assert "regcache.store" not in imports_of("regcache.upstream")
    assert "regcache.manifests" in imports_of("regcache.upstream")


def test_the_manifest_module_does_no_io():
    """
    regcache.manifests imports nothing that reaches a disk, a socket or the
    reactor: it is a value and pure parsing.
    """
    assert imports_of("regcache.manifests") <= {"json", "dataclasses", "typing", "regcache.reference"}


def test_one_list_of_manifest_media_types():
    """
    The media types have one home: the tag keys and the mirror use the
    very list regcache.manifests holds, and the upstream keeps none.
    """
    from regcache import mirror, tags, upstream

    assert tags.MANIFEST_MEDIA_TYPES is MANIFEST_MEDIA_TYPES
    assert mirror.MANIFEST_MEDIA_TYPES is MANIFEST_MEDIA_TYPES
    assert not hasattr(upstream, "MANIFEST_TYPES")
    assert (SCHEMA1, SCHEMA1_SIGNED) == MANIFEST_MEDIA_TYPES[4:]
    assert len(set(MANIFEST_MEDIA_TYPES)) == 6


def test_a_manifest_is_its_bytes():
    """A manifest's size is its body's length, and it is a frozen value."""
    m = Manifest(b"{}", MANIFEST_MEDIA_TYPES[0], Digest.of(b"{}"))
    assert m.size == 2
    with pytest.raises(AttributeError):
        m.body = b""


def test_references_name_every_descriptor():
    """Config, layers, child manifests and blobs are named with their declared sizes."""
    doc = {
        "config": {"digest": "sha256:" + "1" * 64, "size": 7},
        "layers": [{"digest": "sha256:" + "2" * 64, "size": 9}, {"digest": "sha256:" + "3" * 64}],
        "manifests": [{"digest": "sha256:" + "4" * 64, "size": -1}],
        "blobs": [{"digest": "sha256:" + "5" * 64, "size": 1}],
    }
    found = list(references(json.dumps(doc).encode()))
    assert [(str(d), n) for d, n in found] == [
        ("sha256:" + "1" * 64, 7), ("sha256:" + "2" * 64, 9), ("sha256:" + "3" * 64, None),
        ("sha256:" + "4" * 64, None), ("sha256:" + "5" * 64, 1),
    ]


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b'"text"', b"\xff\xfe",
    json.dumps({"layers": [{"digest": "blake3:" + HEX}, {"digest": "../x"}, "junk", {"size": 3}]}).encode(),
])
def test_references_of_what_is_no_manifest_are_none(body):
    """Unparsable bytes, other JSON and descriptors with bad digests name nothing, and never raise."""
    assert list(references(body)) == []


@pytest.mark.parametrize("body,expected", [
    (json.dumps({"mediaType": MANIFEST_MEDIA_TYPES[2]}).encode(), MANIFEST_MEDIA_TYPES[2]),
    (json.dumps({"mediaType": "text/html"}).encode(), "text/html"),
    (json.dumps({"schemaVersion": 1}).encode(), SCHEMA1_SIGNED),
    (json.dumps({"mediaType": ""}).encode(), SCHEMA1_SIGNED),
    (b"[]", SCHEMA1_SIGNED),
    (b"garbage", SCHEMA1_SIGNED),
])
def test_an_untyped_answer_is_sniffed_from_its_body(body, expected):
    """
    A manifest upstream sent with no Content-Type has the type its body
    names, else schema1's, as containerd reads one sent as text/plain.
    """
    assert sniffed_type(body) == expected


@pytest.mark.parametrize("body,expected", [
    (json.dumps({"mediaType": MANIFEST_MEDIA_TYPES[3]}).encode(), MANIFEST_MEDIA_TYPES[3]),
    (json.dumps({"schemaVersion": 1}).encode(), SCHEMA1),
    (json.dumps({"schemaVersion": 1, "signatures": []}).encode(), SCHEMA1_SIGNED),
    (json.dumps({"mediaType": "text/html", "schemaVersion": 1}).encode(), None),
    (json.dumps({"schemaVersion": 2}).encode(), None),
    (json.dumps({"mediaType": ["x"]}).encode(), None),
    (b"<html></html>", None),
    (b"[]", None),
])
def test_a_body_declares_a_manifest_type_or_none(body, expected):
    """
    The manifest type bytes declare: their ``mediaType``, or schema1 (signed
    or not) by ``schemaVersion``; anything else declares none.
    """
    assert declared_type(body) == expected
