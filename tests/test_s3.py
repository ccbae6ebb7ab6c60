"""
regcache.s3 against a scripted HTTP client: what it signs and sends, and how
it reads what a store answers, including the answers a store should not
give.  tests/integration/test_s3_proc.py runs the same calls against a real
SeaweedFS.
"""

from typing import List

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from regcache.s3 import MAX_SMALL_BODY, S3, BucketSettings, StorageError

SETTINGS = BucketSettings("http://store.test:8333", "cache", "id", "secret", prefix="rc/")


class _Transport:
    def stopProducing(self):
        pass

    def abortConnection(self):
        pass


class _Collect:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


class FakeResponse:
    def __init__(self, code: int, body: bytes = b"", headers=None, method: bytes = b"GET", length=None):
        self.code = code
        self.phrase = b"Phrase"
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self._body = body
        self.length = len(body) if length is None else length
        self.request = type("Request", (), {"method": method})()

    def deliverBody(self, protocol):
        protocol.makeConnection(_Transport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeHTTP:
    """Records each request and answers with the next scripted response (or a Deferred never fired)."""

    def __init__(self, *answers):
        self.answers: List = list(answers)
        self.sent = []

    def request(self, method, url, headers=None, data=None, allow_redirects=True, unbuffered=False):
        body = b""
        if data is not None:
            consumer = _Collect()
            data.startProducing(consumer)
            body = consumer.data
        self.sent.append((method, url, {k.decode(): v[0].decode() for k, v in headers.items()}, body,
                          allow_redirects))
        answer = self.answers.pop(0)
        return answer if isinstance(answer, Deferred) else succeed(answer)


def run(coro):
    d = Deferred.fromCoroutine(coro)
    results = []
    d.addBoth(results.append)
    assert results, "the call did not finish"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def s3(http, clock=None, settings=SETTINGS):
    return S3(settings, http, clock or Clock(), run=None)


def test_requests_are_signed_and_never_follow_redirects():
    """SigV4 headers with the body's own hash, the prefix on the key, path-style URL, no redirect following."""
    http = FakeHTTP(FakeResponse(200, method=b"PUT"))
    assert run(s3(http).put("tags/a", b"{}", content_type="application/json"))
    method, url, headers, _, follow = http.sent[0]
    assert (method, url, follow) == ("PUT", "http://store.test:8333/cache/rc/tags/a", False)
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=id/")
    assert headers["X-Amz-Content-SHA256"] == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


@pytest.mark.parametrize("endpoint, header", [
    ("http://store.test:8333", "If-None-Match"),
    ("https://storage.googleapis.com", "x-goog-if-generation-match"),
])
def test_create_only_is_each_stores_own_condition(endpoint, header):
    """S3 and SeaweedFS read If-None-Match on writes; GCS's XML API needs its generation condition."""
    http = FakeHTTP(FakeResponse(412, method=b"PUT"))
    settings = BucketSettings(endpoint, "cache", "id", "secret")
    assert run(s3(http, settings=settings).put("leases/x", b"me", create_only=True)) is False
    assert header in http.sent[0][2]


def test_a_missing_object_is_none_and_a_refusal_is_an_error():
    """404 means absent; 403 (a bad key) is the store failing, with its error code in words."""
    http = FakeHTTP(FakeResponse(404, method=b"HEAD"),
                    FakeResponse(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>"))
    assert run(s3(http).head("blobs/x")) is None
    with pytest.raises(StorageError, match="403.*SignatureDoesNotMatch") as e:
        run(s3(http).read("blobs/x"))
    assert e.value.status == 403


def test_a_head_gives_the_objects_size_and_metadata():
    """A HEAD's size is its Content-Length header, and x-amz-meta-* come back as metadata."""
    http = FakeHTTP(FakeResponse(200, method=b"HEAD", length=0,
                                 headers={b"content-length": b"1234", b"etag": b'"e"',
                                          b"x-amz-meta-media-type": b"application/json"}))
    info = run(s3(http).head("manifests/x"))
    assert (info.size, info.etag, info.metadata) == (1234, '"e"', {"media-type": "application/json"})


def test_no_answer_within_the_deadline_is_a_storage_error():
    """A store that never answers costs the deadline, then the call fails: it never hangs."""
    clock = Clock()
    d = Deferred.fromCoroutine(s3(FakeHTTP(Deferred()), clock).head("blobs/x"))
    failures = []
    d.addErrback(failures.append)
    clock.advance(9.9)
    assert not failures
    clock.advance(0.2)
    assert failures and failures[0].check(StorageError)


def test_a_small_object_larger_than_the_cap_is_refused_unread():
    """A manifest or tag object past MAX_SMALL_BODY is an error, not a big read into memory."""
    http = FakeHTTP(FakeResponse(200, b"", length=MAX_SMALL_BODY + 1))
    with pytest.raises(StorageError, match="more than"):
        run(s3(http).read("manifests/x"))


def test_a_range_read_reports_the_whole_objects_size():
    """A resumed read (206) knows the size of the whole object from Content-Range."""
    http = FakeHTTP(FakeResponse(206, b"tail", headers={b"content-range": b"bytes 6-9/10"}))
    info, response = run(s3(http).open("blobs/x", start=6))
    assert info.size == 10
    assert http.sent[0][2]["Range"] == "bytes=6-"


def test_a_range_read_without_the_size_is_refused():
    """A 206 that does not say how big the object is cannot be resumed safely."""
    http = FakeHTTP(FakeResponse(206, b"tail", headers={b"content-range": b"bytes 6-9/*"}))
    with pytest.raises(StorageError, match="size"):
        run(s3(http).open("blobs/x", start=6))


def test_a_complete_multipart_upload_that_fails_after_its_200(tmp_path):
    """S3 may answer CompleteMultipartUpload with 200 and an error body: a lost race is False, and aborted."""
    path = tmp_path / "blob"
    path.write_bytes(b"abcdefghijkl")

    def thread(f, *args):
        return succeed(f(*args))

    http = FakeHTTP(
        FakeResponse(200, b"<InitiateMultipartUploadResult><UploadId>u1</UploadId></InitiateMultipartUploadResult>"),
        FakeResponse(200, headers={b"etag": b'"p1"'}, method=b"PUT"),
        FakeResponse(200, headers={b"etag": b'"p2"'}, method=b"PUT"),
        FakeResponse(200, b"<Error><Code>PreconditionFailed</Code></Error>", method=b"POST"),
        FakeResponse(204, method=b"DELETE"),
    )
    store = S3(SETTINGS, http, Clock(), thread, part_size=6)
    assert run(store.upload("blobs/x", str(path), 12, "ab" * 32, "application/octet-stream")) is False
    methods = [(m, url.split("?")[1] if "?" in url else "") for m, url, *_ in http.sent]
    assert methods == [("POST", "uploads="), ("PUT", "partNumber=1&uploadId=u1"), ("PUT", "partNumber=2&uploadId=u1"),
                       ("POST", "uploadId=u1"), ("DELETE", "uploadId=u1")]
    assert (http.sent[1][3], http.sent[2][3]) == (b"abcdef", b"ghijkl")
    assert http.sent[3][2]["If-None-Match"] == "*"
    assert b"<ETag>\"p2\"</ETag>" in http.sent[3][3]


def test_a_presigned_url_needs_no_credentials_and_expires():
    """The URL carries its own signature and lifetime: a client sends no Authorization of its own."""
    url = s3(FakeHTTP()).presign("blobs/sha256/ab/abcd", 600)
    assert url.startswith("http://store.test:8333/cache/rc/blobs/sha256/ab/abcd?")
    assert "X-Amz-Expires=600" in url and "X-Amz-Signature=" in url and "secret" not in url


def test_the_secret_never_shows_in_the_settings_repr():
    """Settings are logged; the secret key is not in what is logged."""
    assert "secret" not in repr(SETTINGS)


def test_a_range_read_from_the_wrong_offset_is_refused():
    """
    A 206 whose Content-Range starts elsewhere than asked (a lying or
    broken store) would put its bytes at the wrong place in the blob: it
    is refused, as upstream's are (regcache.upstream._extent).
    """
    http = FakeHTTP(FakeResponse(206, b"0123456789", headers={b"content-range": b"bytes 0-9/10"}))
    with pytest.raises(StorageError, match="wrong place|offset|start"):
        run(s3(http).open("blobs/x", start=6))


class _Endless:
    """A response body that never ends: records whether its reader gave the connection up."""

    def __init__(self, code, length, method=b"GET"):
        self.code = code
        self.phrase = b"Phrase"
        self.headers = Headers({})
        self.length = length
        self.request = type("Request", (), {"method": method})()
        self.stopped = False

    def deliverBody(self, protocol):
        body = self

        class T(_Transport):
            def stopProducing(self):
                body.stopped = True

        protocol.makeConnection(T())
        protocol.dataReceived(b"x" * 1024)


def test_a_huge_body_refused_unread_gives_its_connection_up():
    """
    A body past MAX_SMALL_BODY is refused: its connection is given up,
    not read to its (maybe never coming) end, holding a socket for ever.
    """
    response = _Endless(200, 1 << 40)
    with pytest.raises(StorageError, match="more than"):
        run(s3(FakeHTTP(response)).read("manifests/x"))
    assert response.stopped


def test_an_unwanted_body_that_never_ends_is_given_up_at_the_deadline():
    """
    A 404 (or any answer whose body is not wanted) whose body drips or
    hangs is read to its end at most for the deadline, then its connection
    is given up: a lying store cannot hold one socket per request.
    """
    clock = Clock()
    response = _Endless(404, 4096)
    assert run(s3(FakeHTTP(response), clock).open("blobs/x")) is None
    clock.advance(11)
    assert response.stopped
