# test-case-name: tests.test_reference
"""
The grammar that stands between a request and the disk or the upstream.
"""

import pytest
from hypothesis import given, strategies as st

from regcache.errors import RegistryError
from regcache.reference import Digest, check_name, check_tag, split_path

HEX64 = "a" * 64


@pytest.mark.parametrize("name", ["alpine", "library/alpine", "org/team/app", "a.b_c__d-e--f/x", "0/1/2"])
def test_valid_names_pass(name):
    """Names in the OCI grammar, including several components, are accepted."""
    assert check_name(name) == name


@pytest.mark.parametrize("name", [
    "", "Alpine", "../etc", "a/../b", "/abs", "a//b", "a/", "a/./b", "-a", "a_", "a%2fb", "a b", "a\x00",
    "x" * 256,
])
def test_invalid_names_are_refused(name):
    """Traversal, empty components, capitals and over-long names are NAME_INVALID."""
    with pytest.raises(RegistryError) as e:
        check_name(name)
    assert e.value.code == "NAME_INVALID" and e.value.status == 400


@pytest.mark.parametrize("tag", ["latest", "1.2.3", "v1_rc-2", "A" * 128])
def test_valid_tags(tag):
    """Tags in the OCI grammar are accepted."""
    assert check_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".hidden", "-x", "a/b", "A" * 129, "a:b", ".."])
def test_invalid_tags(tag):
    """Tags outside the grammar are a 400."""
    with pytest.raises(RegistryError) as e:
        check_tag(tag)
    assert e.value.status == 400


def test_digest_parse_and_format():
    """A sha256 or sha512 digest round-trips and knows its hasher."""
    d = Digest.parse("sha256:" + HEX64)
    assert str(d) == "sha256:" + HEX64 and d.hasher().name == "sha256"
    assert Digest.parse("sha512:" + "b" * 128).algorithm == "sha512"
    assert Digest.of(b"") == Digest.parse(
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@pytest.mark.parametrize("text", [
    "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha256:../../etc/passwd", "sha256", ":abc",
    "sha512:" + "a" * 64, "sha256:" + HEX64 + "/x",
])
def test_malformed_digests(text):
    """Wrong lengths, capitals or path characters are DIGEST_INVALID."""
    with pytest.raises(RegistryError) as e:
        Digest.parse(text)
    assert e.value.code == "DIGEST_INVALID"


def test_unknown_algorithm_is_refused():
    """
    A well-formed digest regcache cannot verify is refused as a 400
    DIGEST_INVALID, not cached unchecked and not answered as a bad method.
    """
    with pytest.raises(RegistryError) as e:
        Digest.parse("blake3:" + HEX64)
    assert (e.value.code, e.value.status) == ("DIGEST_INVALID", 400)
    assert "blake3" in e.value.message


@pytest.mark.parametrize("path,expected", [
    ("library/alpine/manifests/3.20", ("library/alpine", "manifests", "3.20")),
    ("a/blobs/b/manifests/latest", ("a/blobs/b", "manifests", "latest")),
    ("a/manifests/b/blobs/sha256:x", ("a/manifests/b", "blobs", "sha256:x")),
    ("org/team/app/tags/list", ("org/team/app", "tags", "")),
    ("blobs/blobs/sha256:x", ("blobs", "blobs", "sha256:x")),
])
def test_split_routes_on_the_last_keyword(path, expected):
    """A name may contain 'blobs' or 'manifests' components: the last keyword routes."""
    assert split_path(path) == expected


def test_split_rejects_non_api_paths():
    """Paths without a pull-API keyword do not route."""
    assert split_path("library/alpine") is None
    assert split_path("/manifests/x") is None


@given(st.text(max_size=300))
def test_grammar_never_crashes(text):
    """Any string is either accepted or refused with a RegistryError."""
    for check in (check_name, check_tag, Digest.parse):
        try:
            check(text)
        except RegistryError:
            pass
    split_path(text)
