# test-case-name: tests.test_reference
"""
The grammar that stands between a request and the disk or the upstream.
"""

import pytest
from hypothesis import given, strategies as st

from regcache.errors import RegistryError
from regcache.reference import Digest, InvalidReference, check_name, check_tag

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
    """Traversal, empty components, capitals and over-long names are refused as a bad name."""
    with pytest.raises(InvalidReference) as e:
        check_name(name)
    assert e.value.kind == "name"
    assert e.value.message == f"invalid repository name: {name[:300]!r}"


@pytest.mark.parametrize("tag", ["latest", "1.2.3", "v1_rc-2", "A" * 128])
def test_valid_tags(tag):
    """Tags in the OCI grammar are accepted."""
    assert check_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".hidden", "-x", "a/b", "A" * 129, "a:b", ".."])
def test_invalid_tags(tag):
    """Tags outside the grammar are refused as a bad tag."""
    with pytest.raises(InvalidReference) as e:
        check_tag(tag)
    assert e.value.kind == "tag"
    assert e.value.message == f"invalid tag: {tag!r}"


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
    """Wrong lengths, capitals or path characters are refused as a bad digest."""
    with pytest.raises(InvalidReference) as e:
        Digest.parse(text)
    assert e.value.kind == "digest"


def test_unknown_algorithm_is_refused():
    """
    A well-formed digest regcache cannot verify is refused for its
    algorithm, naming it and the ones regcache verifies, rather than
    cached unchecked.
    """
    with pytest.raises(InvalidReference) as e:
        Digest.parse("blake3:" + HEX64)
    assert e.value.kind == "algorithm"
    assert "blake3" in e.value.message and "sha256" in e.value.message


def test_the_grammar_knows_no_http():
    """
    A refusal carries what was wrong and in which kind of reference, and no
    HTTP status or OCI code: those are the routes' to choose.
    """
    with pytest.raises(InvalidReference) as e:
        check_name("Alpine")
    assert not isinstance(e.value, RegistryError)
    assert not hasattr(e.value, "status") and not hasattr(e.value, "code")
    assert str(e.value) == e.value.message


@given(st.text(max_size=300))
def test_grammar_never_crashes(text):
    """Any string is either accepted or refused with an InvalidReference."""
    for check in (check_name, check_tag, Digest.parse):
        try:
            check(text)
        except InvalidReference:
            pass


def test_the_grammar_routes_no_paths():
    """Splitting a request path into name and kind is the routes' job, not the grammar's."""
    import regcache.reference

    assert not hasattr(regcache.reference, "split_path")
