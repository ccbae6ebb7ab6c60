"""
Property tests over every parser that reads what a client, an upstream or
an operator wrote (names, tags, digests, references, Range, Accept,
durations, sizes, Retry-After, lengths, rate-limit headers, redirect
targets, manifest bodies): whatever the input, the parser answers with a value of
its own contract or its one refusal, never another exception, and no name
it accepts can place a file outside the store.

Hypothesis prints the falsifying example (and ``--hypothesis-seed`` replays
a run), so a failure here can be reproduced as it was found.
"""

import os
import string

from hypothesis import given, settings, strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.web.http_headers import Headers

from regcache import body, config, headers, manifests, upstream_http
from regcache.errors import RegistryError
from regcache.policy import Policy, Registry
from regcache.reference import Digest, InvalidReference, check_name, check_tag
from regcache.routes import merged_accept, split_path
from regcache.store import Store
from tests.support import HandFedUpstream, inline

#: Text a header or a path may carry, biased towards the characters that
#: mean something to the parsers (digits of other scripts, separators,
#: dots and slashes), plus anything else Unicode has.
tricky = st.text(
    alphabet=st.one_of(st.sampled_from("0123456789-=,;:./\\%_ \t²١٢۳\u0660\ufeffbytesBYTES"), st.characters()),
    max_size=120,
)
raw = st.one_of(st.binary(max_size=120), tricky.map(lambda t: t.encode("utf-8", "surrogatepass")))


@given(raw, st.integers(min_value=0, max_value=2**63))
def test_a_range_header_is_a_span_inside_the_blob_or_a_refusal(value, size):
    """
    Any Range header against any blob size is the whole blob (None), a
    416 (Unsatisfiable), or a non-empty span inside the blob.
    """
    try:
        span = body.parse_range(value, size)
    except body.Unsatisfiable:
        return
    if span is not None:
        start, end = span
        assert 0 <= start < end <= size


@given(st.lists(raw, max_size=6))
def test_accept_headers_read_as_media_types_without_parameters(values):
    """However many Accept lines of whatever bytes, they read as a list of stripped types."""

    class Request:
        requestHeaders = Headers({b"accept": values} if values else {})

    types = merged_accept(Request())
    assert all(isinstance(t, str) and t and t == t.strip() and "," not in t and ";" not in t for t in types)
    assert len(types) == len(set(types))


@given(tricky)
def test_durations_are_finite_bounded_seconds_or_a_config_error(text):
    """A duration an operator typed is finite, not negative and at most ten years, or a ConfigError."""
    try:
        seconds = config.parse_duration("x", text)
    except config.ConfigError:
        return
    assert 0 <= seconds <= config.MAX_DURATION


@given(tricky)
def test_sizes_are_positive_bounded_integers_or_a_config_error(text):
    """A size is a positive integer of at most 2**60 bytes, or a ConfigError."""
    try:
        size = config.parse_size("x", text)
    except config.ConfigError:
        return
    assert isinstance(size, int) and 0 < size <= config.MAX_SIZE


@given(raw)
def test_retry_after_is_clamped_or_ignored(value):
    """
    A Retry-After, whatever upstream sent, is a pause within the clamp or
    is ignored: never negative, never years, never an exception.
    """
    seconds = headers.retry_after(Headers({b"retry-after": [value]}))
    low, high = headers.RETRY_AFTER_RANGE
    assert seconds is None or low <= seconds <= high


@given(raw, raw)
def test_rate_limit_headers_read_as_bounded_numbers_or_nothing(limit, remaining):
    """
    ``ratelimit-limit`` / ``ratelimit-remaining`` of any bytes read as a
    plain non-negative count and window, or as unknown; the accounting's
    record of them never raises.
    """
    from regcache.accounting import RateLimit

    answer = Headers({b"ratelimit-limit": [limit], b"ratelimit-remaining": [remaining]})
    for name in (b"ratelimit-limit", b"ratelimit-remaining"):
        count, window = headers.ratelimit(answer, name)
        assert count is None or (isinstance(count, int) and 0 <= count < 10**30)
        assert window is None or (isinstance(window, int) and 0 <= window < 10**30)
    seen = RateLimit.parse(answer, 0.0)
    assert seen is None or seen.limit is not None or seen.remaining is not None


@given(raw)
def test_a_content_length_is_a_plain_decimal_or_unknown(value):
    """Only ASCII digits make a length; "²", "1_0" or 400 digits are unknown."""
    n = headers.content_length(Headers({b"content-length": [value]}))
    assert n is None or (isinstance(n, int) and 0 <= n < 10**30)


@given(st.sampled_from(["https://registry-1.docker.io/v2/", "http://127.0.0.1:5000/x"]),
       st.one_of(tricky, st.sampled_from(["http://[::1]:22/", "//[fe80::1%25eth0]/", "http://[::ffff:1.2.3.4]/x",
                                          "https://ex\u00e4mple.com/", "http://a..b/", "http://" + "a" * 64 + ".com/"])))
def test_a_location_or_realm_is_an_http_url_with_a_host_or_nothing(base, reference):
    """What upstream names as a place to go is an http(s) URL with a host and a valid port, or None."""
    parts = headers.http_url(base, reference)
    if parts is not None:
        assert parts.scheme in ("http", "https") and parts.hostname
        assert parts.port is None or 0 <= parts.port <= 65535
        # The upstream client can make a request of it: no exception on the way.
        reactor = MemoryReactorClock()
        upstream_http.client(reactor, 5).get(parts.geturl()).addErrback(lambda f: None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
documents = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: __import__("json").dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "schemaVersion": st.sampled_from([1, 2, "2", None]),
            "mediaType": st.sampled_from(list(manifests.MANIFEST_MEDIA_TYPES) + ["x", ""]),
            "config": json_values,
            "layers": st.lists(json_values, max_size=3),
            "manifests": st.lists(
                st.fixed_dictionaries({}, optional={
                    "digest": st.sampled_from(["sha256:" + "a" * 64, "sha256:x", "", "md5:00"]),
                    "size": st.one_of(st.integers(), st.booleans(), st.text(max_size=3)),
                    "mediaType": st.sampled_from([manifests.OCI_INDEX, 3, None]),
                }),
                max_size=3,
            ),
        },
    ).map(lambda v: __import__("json").dumps(v).encode()),
)


@given(documents)
def test_manifest_bodies_are_read_without_exceptions(data):
    """
    Whatever bytes upstream sent as a manifest, its declared type is one
    regcache serves or None, the descriptors it names are well-formed
    digests with sizes that are non-negative or unknown, and the index
    check passes or raises ValueError.
    """
    declared = manifests.declared_type(data)
    assert declared is None or declared in manifests.MANIFEST_MEDIA_TYPES
    assert isinstance(manifests.sniffed_type(data), str)
    for digest, size in manifests.references(data):
        assert isinstance(digest, Digest)
        assert size is None or (isinstance(size, int) and size >= 0)
    try:
        manifests.check_index(data)
    except ValueError:
        pass


path_text = st.text(alphabet=st.sampled_from(string.ascii_letters + string.digits + "._-/:%\\ @"), max_size=80)


@settings(max_examples=300)
@given(path_text, st.one_of(st.none(), path_text))
def test_every_routed_name_is_a_grammatical_repository(path, ns):
    """
    Any path after /v2/ and any ns either routes to a configured registry
    with a name of the grammar, or is refused with an OCI error: the name
    that reaches the store and upstream URLs never holds ``..``, a leading
    slash or anything outside the grammar.
    """
    upstream = HandFedUpstream()
    hub = Registry("docker.io", frozenset(["docker.io"]), upstream, 60, None)
    ghcr = Registry("ghcr.io", frozenset(["ghcr.io"]), HandFedUpstream(), 60, None, alias="ghcr")
    policy = Policy([hub, ghcr], None)
    parts = split_path(path)
    if parts is None:
        return
    name, _, reference = parts
    try:
        route = policy.route(name, ns)
    except (InvalidReference, RegistryError):
        return
    assert route.registry in (hub, ghcr)
    assert check_name(route.name) == route.name
    assert ".." not in route.name.split("/") and not route.name.startswith("/")


digestish = st.one_of(
    st.text(max_size=140),
    st.tuples(st.sampled_from(["sha256", "sha512", "sha384", "../sha256", "sha256/.."]),
              st.text(alphabet="0123456789abcdefABCDEF./", min_size=60, max_size=130)).map(":".join),
)


@given(digestish)
def test_stored_paths_never_leave_the_store(text):
    """
    A digest that parses lands at a path under the store's blobs
    directory, whatever text it was parsed from; tags that pass the grammar
    hold no path separator.
    """
    root = "/var/lib/regcache-prop"
    store = Store(root, inline, lambda: 0.0)
    try:
        digest = Digest.parse(text)
    except InvalidReference:
        pass
    else:
        path = os.path.normpath(store.blob_path(digest))
        assert path.startswith(os.path.join(root, "blobs") + os.sep)
    try:
        tag = check_tag(text)
    except InvalidReference:
        return
    assert "/" not in tag and "\\" not in tag and tag not in (".", "..")
