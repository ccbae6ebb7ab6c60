# test-case-name: tests.integration.test_fuzz_http
"""
A bounded fuzz of the HTTP surface of a real regcache process: random
methods, paths, headers, encodings, bodies and pipelined requests.  Every
request is complete as sent (a slow or unfinished one is a different test),
so each must get a well-formed response or a clean close; none may get a
500, crash the process or leave a descriptor behind.

The seed and the count are printed; ``REGCACHE_FUZZ_SEED`` and
``REGCACHE_FUZZ_COUNT`` replay or lengthen a run.
"""

import os
import random
import re
import socket
import time
import urllib.request
from urllib.parse import urlsplit

from tests.integration.test_descriptors_proc import census
from tests.integration.procs import wait_for

STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2}) [^\r\n]*")
HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+: ?[^\r\n]*")

METHODS = [b"GET"] * 8 + [b"HEAD"] * 4 + [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
           b"get", b"BREW", b"G\xc3\x89T", b"GET\x00", b"M" * 300]
VERSIONS = [b"HTTP/1.1"] * 20 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1x", b"FOO/1.1", b""]


class Fuzzer:
    """Random but complete requests against what the mirror holds."""

    def __init__(self, rng: random.Random, image):
        self.rng = rng
        self.names = ["library/small", "small", "docker.io/library/small", "library/absent", "ci/private",
                      "ghcr.io/owner/app", "a/b/c/d/e/f", "UPPER/case", "..", "a/../b", "a//b", "-a", "a" * 300]
        self.digests = [str(image.digest), str(image.layers[0].digest), "sha256:" + "0" * 64, "sha256:xyz",
                        "md5:" + "0" * 32, "sha256:" + "A" * 64, "sha512:" + "1" * 128, ""]
        self.tags = ["1", "latest", "-bad", "x" * 200, "%2e%2e", "a:b"]

    def pick(self, things):
        return self.rng.choice(things)

    def path(self) -> bytes:
        r = self.rng.random()
        name = self.pick(self.names)
        if r < 0.25:
            path = f"/v2/{name}/manifests/{self.pick(self.tags + self.digests)}"
        elif r < 0.45:
            path = f"/v2/{name}/blobs/{self.pick(self.digests)}"
        elif r < 0.5:
            path = f"/v2/{name}/tags/list?n={self.pick(['1', '-1', '99999999999999999999', 'x'])}"
        elif r < 0.55:
            path = f"/v2/{name}/referrers/{self.pick(self.digests)}?artifactType={self.pick(['a/b', '%00', ''])}"
        elif r < 0.65:
            path = self.pick(["/", "/v2/", "/v2", "/healthz", "/readyz", "/metrics", "/v2/_catalog", "*",
                              "http://169.254.169.254/v2/", "//etc/passwd", "/v2/%2e%2e/%2e%2e/etc/passwd",
                              "/v2/library/small/manifests/1?ns=127.0.0.1:22", "/v2/..%2f..%2f/blobs/x",
                              "/static/../../etc/passwd", "/v2/library/small/blobs/uploads/"])
        else:
            alphabet = "abc/._-:%?#&=~@!$'()*+,;\\ \t"
            path = "/" + "".join(self.rng.choice(alphabet) for _ in range(self.rng.randrange(0, 60)))
        data = path.encode("utf-8")
        if self.rng.random() < 0.1:
            # Bytes no URL should carry: NUL, high bytes, a bare CR.
            i = self.rng.randrange(len(data) + 1)
            data = data[:i] + self.pick([b"\x00", b"\xff\xfe", b"\r", b"\x7f", "é".encode()]) + data[i:]
        if self.rng.random() < 0.02:
            data = b"/v2/" + b"a/" * 5000
        return data

    def headers(self):
        pool = [
            (b"Host", self.pick([b"mirror", b"", b"169.254.169.254", b"127.0.0.1:22", b"a" * 300, b"[::1]"])),
            (b"Range", self.pick([b"bytes=0-10", b"bytes=-5", b"bytes=5-3", b"bytes=" + b"9" * 4400 + b"-",
                                  b"bytes=0-1,4-5", b"items=0-1", "bytes=²-".encode(), b"bytes=--1"])),
            (b"Accept", self.pick([b"*/*", b"application/vnd.oci.image.index.v1+json",
                                   b"application/vnd.docker.distribution.manifest.v2+json;q=0.5, x/y",
                                   b",,,;;;", b"\xff\xfe"])),
            (b"Accept-Encoding", self.pick([b"gzip", b"br, zstd", b"identity;q=0"])),
            (b"Authorization", self.pick([b"Basic Zm9vOmJhcg==", b"Basic !!!", b"Bearer x", b"Basic"])),
            (b"X-Forwarded-For", self.pick([b"1.2.3.4", b"::1, 10.0.0.1", b"garbage"])),
            (b"If-None-Match", b'"sha256:' + b"0" * 64 + b'"'),
            (b"Connection", self.pick([b"close", b"keep-alive", b"upgrade"])),
            (b"Upgrade", b"h2c"),
            (b"Expect", b"100-continue"),
            (b"X-" + b"a" * self.rng.randrange(1, 100), b"v" * self.rng.randrange(0, 2000)),
        ]
        chosen = self.rng.sample(pool, self.rng.randrange(0, 5))
        if self.rng.random() < 0.05:
            chosen.append((b"X-Big", b"x" * 20000))
        return chosen

    def body(self):
        """Headers and bytes of a body that is complete as framed, if any."""
        r = self.rng.random()
        if r < 0.8:
            return [], b""
        data = os.urandom(self.rng.randrange(0, 3000))
        if r < 0.9:
            return [(b"Content-Length", str(len(data)).encode())], data
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 500]), data[i:i + 500]) for i in range(0, len(data), 500))
        return [(b"Transfer-Encoding", b"chunked")], chunks + b"0\r\n\r\n"

    def request(self) -> bytes:
        if self.rng.random() < 0.03:
            return os.urandom(self.rng.randrange(1, 200)) + b"\r\n\r\n"
        framing, body = self.body()
        line = b" ".join(x for x in (self.pick(METHODS), self.path(), self.pick(VERSIONS)) if x)
        lines = [line, *(k + b": " + v for k, v in self.headers() + framing)]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


class NeedMore(Exception):
    """The bytes so far end inside a response."""


def _responses(data: bytes, methods, closed: bool = False):
    """
    The status codes of the well-formed responses ``data`` holds, in order,
    one per request at most.  Raises NeedMore if it ends inside one, and
    AssertionError at anything that is not HTTP.  Once the server has
    ``closed``, a response without a length ends where the bytes do.
    """
    codes = []
    rest = data
    pending = list(methods)
    while pending and rest:
        method = pending[0]
        head, sep, body = rest.partition(b"\r\n\r\n")
        if not sep:
            raise NeedMore()
        status, *fields = head.split(b"\r\n")
        m = STATUS_LINE.fullmatch(status)
        assert m, f"not a status line: {status[:200]!r}"
        code = int(m.group(1))
        for field in fields:
            assert HEADER_LINE.fullmatch(field), f"not a header line: {field[:200]!r}"
        headers = {f.split(b":", 1)[0].lower(): f.split(b":", 1)[1].strip() for f in fields}
        rest = body
        if code < 200:
            continue  # an interim answer (100 Continue): the final one follows
        codes.append(code)
        pending.pop(0)
        if method == b"HEAD" or code in (204, 304):
            continue
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            if len(rest) < n:
                raise NeedMore()
            rest = rest[n:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size_line, sep, after = rest.partition(b"\r\n")
                if not sep:
                    raise NeedMore()
                n = int(size_line.split(b";")[0], 16)
                if len(after) < n + 2:
                    raise NeedMore()
                rest = after[n + 2:]
                if n == 0:
                    break
        elif closed:
            break
        else:
            raise NeedMore()
    return codes


def _exchange(port: int, payload: bytes, methods, timeout: float = 20.0):
    """
    Send ``payload`` on a new connection and read until every request has
    its answer or the server closes; the status codes answered.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        s.sendall(payload)
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                try:
                    return _responses(got, methods, closed=True)
                except NeedMore:
                    raise AssertionError(f"the connection closed inside a response: {got[-300:]!r}") from None
            got += chunk
            try:
                codes = _responses(got, methods)
            except NeedMore:
                continue
            if len(codes) == len(methods):
                return codes
    except (ConnectionResetError, BrokenPipeError):
        return _responses(got, methods, closed=True)
    finally:
        s.close()


def _method(request: bytes) -> bytes:
    return request.split(b" ", 1)[0]


def test_random_requests_get_well_formed_answers_and_leak_nothing(hub, regcache, images, tmp_path):
    """
    Hundreds of random, complete requests, alone or pipelined, each get
    well-formed HTTP answers (or a clean close), never a 500; afterwards the
    process still serves, holds exactly the descriptors it held before, and
    the cached image still pulls byte for byte.
    """
    seed = int(os.environ.get("REGCACHE_FUZZ_SEED") or time.time_ns() % 2**32)
    count = int(os.environ.get("REGCACHE_FUZZ_COUNT") or 400)
    print(f"HTTP fuzz: seed {seed}, {count} requests (REGCACHE_FUZZ_SEED={seed} replays it)")
    storage = str(tmp_path / "store")
    rc = regcache(storage=storage)
    port = urlsplit(rc.url).port
    image = images["library/small:1"]
    blob_path = f"/v2/library/small/blobs/{image.layers[0].digest}"
    assert _exchange(port, b"GET /v2/library/small/manifests/1 HTTP/1.1\r\nHost: m\r\nAccept: */*\r\n\r\n",
                     [b"GET"]) == [200]
    assert _exchange(port, f"GET {blob_path} HTTP/1.1\r\nHost: m\r\n\r\n".encode(), [b"GET"]) == [200]
    wait_for(lambda: census(rc.proc.pid, storage, port)[:2] == ([], 0), 30, "the warm-up to settle")
    before = census(rc.proc.pid, storage, port)[2]

    fuzz = Fuzzer(random.Random(seed), image)
    codes = {}
    sent = 0
    while sent < count:
        batch = [fuzz.request() for _ in range(fuzz.rng.choice([1, 1, 1, 2, 3]))]
        sent += len(batch)
        try:
            answered = _exchange(port, b"".join(batch), [_method(r) for r in batch])
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}\nrequests: {batch!r}") from None
        for code in answered:
            codes[code] = codes.get(code, 0) + 1
        assert 500 not in answered, f"seed {seed}: a 500 for {batch!r}"
    print(f"HTTP fuzz: answers by status {dict(sorted(codes.items()))}")
    assert rc.proc.poll() is None, "regcache exited"

    settled = []

    def clean():
        settled[:] = [census(rc.proc.pid, storage, port)]
        files, clients, rest = settled[0]
        return files == [] and clients == 0 and rest == before

    wait_for(clean, 30, f"descriptors to settle (seed {seed}): {settled}")
    with urllib.request.urlopen(rc.url + blob_path, timeout=30) as answer:
        assert answer.read() == image.layers[0].path.read_bytes()
    assert "Unhandled" not in rc.log() and "Traceback" not in rc.log()

