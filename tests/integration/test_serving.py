# test-case-name: tests.integration.test_serving
"""
The two ways regcache sends a cached blob, on real sockets: ``sendfile`` on a
plain TCP listener, and the ``pread`` producer on TLS (where the kernel
cannot copy file to socket).  Both must send exactly the same bytes, for the
whole blob and for ranges, and both must stop sending to a client that stops
reading instead of buffering the blob in memory.

The blob is put straight into the storage directory: a file under ``blobs/``
is a cached blob, so no upstream is needed (regcache is pointed at a closed
port).
"""

import datetime
import hashlib
import ipaddress
import http.client
import re
import socket
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.procs import Regcache, closed_port, free_port

MiB = 1024 * 1024
#: Not a multiple of any chunk or sendfile size, so every edge is exercised.
SIZE = 8 * MiB + 12345
#: For backpressure: far larger than any socket buffer.
BIG = 96 * MiB


def _blob(size: int, seed: bytes):
    data = hashlib.shake_256(seed).digest(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def _cache(storage, data: bytes, digest: str, upstream: str) -> None:
    """Store a blob as a pull of library/app from ``upstream`` would: its data, and a link to library/app."""
    hexd = digest.split(":")[1]
    for kind, content in (("blobs", data), ("links", f"{upstream.split('://')[1]} library/app\n".encode())):
        d = storage / kind / "sha256" / hexd[:2]
        d.mkdir(parents=True, exist_ok=True)
        (d / hexd).write_bytes(content)


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    # The IP address SAN and CA:TRUE let a client that trusts this very
    # certificate verify it properly, as regcache does an HTTPS upstream.
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "tls.key", tmp_path / "tls.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class Server:
    """One regcache process on a plain or a TLS listener."""

    def __init__(self, storage, tls=None, upstream=None, args=()):
        self.tls = tls
        self.port = free_port()
        listen = None
        if tls:
            key, cert = tls
            listen = f"ssl:{self.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        self.proc = Regcache(str(storage), upstream or f"http://127.0.0.1:{closed_port()}",
                             list(args), port=self.port, listen=listen)
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    def start(self) -> "Server":
        self.proc.start(wait=False)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.request("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            if self.proc.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.failed("/readyz did not answer 200")
            time.sleep(0.05)

    def connection(self, timeout: float = 60):
        if self.tls:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.context)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, path: str, headers=None, method: str = "GET"):
        c = self.connection()
        try:
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            return r.status, r.headers, r.read()
        finally:
            c.close()

    def raw_socket(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        # A small receive buffer, so "the client stopped reading" is reached
        # after little data whatever the kernel's autotuning would allow.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        if self.tls:
            s = self.context.wrap_socket(s)
        return s

    def served(self, sender: str) -> float:
        _, _, text = self.request("/metrics")
        m = re.search(rf'^regcache_served_blob_bytes_total{{sender="{sender}"}} (\S+)$', text.decode(), re.M)
        return float(m.group(1)) if m else 0.0

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="module")
def dead_upstream():
    """An upstream nothing listens at: the servers serve only what is cached."""
    return f"http://127.0.0.1:{closed_port()}"


# The blobs (104 MiB to make and hash) and the two servers are shared by
# the tests that only read them: each measures from its own starting point.
@pytest.fixture(scope="module")
def blobs(tmp_path_factory, dead_upstream):
    storage = tmp_path_factory.mktemp("serving") / "store"
    small, small_digest = _blob(SIZE, b"serving")
    big, big_digest = _blob(BIG, b"backpressure")
    _cache(storage, small, small_digest, dead_upstream)
    _cache(storage, big, big_digest, dead_upstream)
    return storage, {"small": (small, small_digest), "big": (big, big_digest)}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, blobs, dead_upstream):
    storage, _ = blobs
    plain = Server(storage, upstream=dead_upstream).start()
    try:
        tls = Server(storage, _self_signed(tmp_path_factory.mktemp("tls")), dead_upstream).start()
    except BaseException:
        plain.stop()  # a second server that did not start must not leave the first running
        raise
    yield {"sendfile": plain, "read": tls}
    plain.stop()
    tls.stop()


RANGES = [
    ("bytes=0-0", 0, 1),
    ("bytes=0-", 0, SIZE),
    ("bytes=100-", 100, SIZE),
    ("bytes=-1000", SIZE - 1000, SIZE),
    ("bytes=1048576-2097151", MiB, 2 * MiB),
    (f"bytes={SIZE - 1}-{SIZE + 50}", SIZE - 1, SIZE),
    ("bytes=262143-8388608", 256 * 1024 - 1, 8 * MiB + 1),
]


def test_sendfile_and_fallback_send_identical_bytes(servers, blobs):
    """
    The whole blob and every range come out byte-identical over plain TCP
    (sendfile) and over TLS (pread producer), and each listener really used
    its own sender.
    """
    _, cached = blobs
    data, digest = cached["small"]
    path = f"/v2/library/app/blobs/{digest}"
    for sender, server in servers.items():
        status, headers, body = server.request(path)
        assert status == 200, sender
        assert headers["Content-Length"] == str(SIZE)
        assert body == data, sender
        for spec, start, end in RANGES:
            status, headers, body = server.request(path, {"Range": spec})
            assert status == 206, (sender, spec)
            assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}", (sender, spec)
            assert body == data[start:end], (sender, spec)
        status, headers, _ = server.request(path, {"Range": f"bytes={SIZE}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{SIZE}", sender
    assert servers["sendfile"].served("sendfile") > 0
    assert servers["sendfile"].served("read") == 0
    assert servers["read"].served("read") > 0
    assert servers["read"].served("sendfile") == 0


def test_many_requests_on_one_keepalive_connection(servers, blobs):
    """
    Bodies sent behind the transport's back (sendfile) leave the HTTP
    connection usable: several blobs and ranges in a row on one connection.
    """
    _, cached = blobs
    data, digest = cached["small"]
    path = f"/v2/library/app/blobs/{digest}"
    for sender, server in servers.items():
        c = server.connection()
        try:
            for spec, start, end in RANGES[:4] + RANGES[:4]:
                c.request("GET", path, headers={"Range": spec})
                r = c.getresponse()
                assert r.status == 206 and r.read() == data[start:end], (sender, spec)
            c.request("GET", path)
            r = c.getresponse()
            assert r.read() == data, sender
        finally:
            c.close()


class _HTTP10(http.client.HTTPConnection):
    """An HTTP/1.0 client, as ``ab -k`` is: it keeps its connection only when asked and told so."""

    _http_vsn, _http_vsn_str = 10, "HTTP/1.0"


def test_an_http_1_0_client_keeps_its_connection_when_it_asks(servers, blobs):
    """
    HTTP/1.0 requests with ``Connection: keep-alive`` (HEADs and GETs of a
    cached blob, whole and ranged) follow one another on one connection,
    each answer saying Keep-Alive; one that does not ask is closed after
    its answer.
    """
    _, cached = blobs
    data, digest = cached["small"]
    path = f"/v2/library/app/blobs/{digest}"
    port = servers["sendfile"].port
    c = _HTTP10("127.0.0.1", port, timeout=60)
    try:
        sock = None
        for method, headers, want in (("HEAD", {}, b""), ("GET", {}, data), ("HEAD", {}, b""),
                                      ("GET", {"Range": "bytes=100-"}, data[100:])):
            c.request(method, path, headers={"Connection": "keep-alive", **headers})
            r = c.getresponse()
            assert r.read() == want, method
            assert r.getheader("Connection") == "Keep-Alive" and not r.will_close, method
            sock = sock or c.sock
            assert c.sock is sock, "the connection was closed between requests"
    finally:
        c.close()
    c = _HTTP10("127.0.0.1", port, timeout=60)
    try:
        c.request("HEAD", path)
        r = c.getresponse()
        r.read()
        assert r.status == 200 and r.will_close
    finally:
        c.close()


@pytest.mark.parametrize("sender", ["sendfile", "read"])
def test_client_that_stops_reading_gets_backpressure(servers, blobs, sender):
    """
    A client that asks for a big blob and reads nothing makes the sender
    pause: only what the socket buffers hold is sent, the server's memory
    does not grow by the blob, and once the client reads, it gets every byte.
    """
    server = servers[sender]
    _, cached = blobs
    data, digest = cached["big"]
    before_rss, before_sent = server.rss_mib(), server.served(sender)
    s = server.raw_socket()
    try:
        s.sendall(f"GET /v2/library/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # Give the server every chance to overrun the client: it would take
        # a fraction of this to push the whole blob out.
        time.sleep(1.5)
        sent = server.served(sender) - before_sent
        assert sent < BIG / 4, f"{sender}: {sent} of {BIG} bytes sent to a client that reads nothing"
        assert server.rss_mib() - before_rss < 32, f"{sender}: server memory grew with the blob"
        received = b""
        while b"\r\n\r\n" not in received:
            received += s.recv(65536)
        head, body = received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200")
        h = hashlib.sha256(body)
        got = len(body)
        while got < BIG:
            chunk = s.recv(1024 * 1024)
            assert chunk, f"connection closed after {got} of {BIG} bytes"
            h.update(chunk)
            got += len(chunk)
        assert got == BIG and "sha256:" + h.hexdigest() == digest
    finally:
        s.close()


def test_blob_still_downloading_is_identical_over_both_senders(hub, images, tmp_path):
    """
    A cold blob reaches a plain-TCP client (sendfile following the growing
    file) and a TLS client (pread following it) byte for byte, and so does
    a Range request that joins while the download may still be running.
    """
    from tests.integration.conftest import USERS

    layer = images["library/large:1"].layers[0]
    data = layer.path.read_bytes()
    password = tmp_path / "password"
    password.write_text(USERS["ci"] + "\n")
    creds = ["--username", "ci", "--password-file", str(password)]
    cert = _self_signed(tmp_path)
    path = f"/v2/library/large/blobs/{layer.digest}"
    start, end = 1000, 9 * MiB + 1
    for sender, tls in (("sendfile", None), ("read", cert)):
        server = Server(tmp_path / sender, tls, hub.registry_url, creds).start()
        try:
            c = server.connection()
            c.request("GET", path)
            r = c.getresponse()
            assert r.status == 200 and r.headers["Content-Length"] == str(layer.size), sender
            first = r.read(MiB)
            status, headers, part = server.request(path, {"Range": f"bytes={start}-{end - 1}"})
            assert status == 206 and part == data[start:end], sender
            assert first + r.read() == data, sender
            c.close()
            assert server.served(sender) > 0
        finally:
            server.stop()


def test_https_upstream_is_verified(hub, regcache, images, tmp_path):
    """
    An HTTPS upstream (here a TLS-listening regcache in front of the fake
    Hub, as in a chain of mirrors) is used with its certificate verified:
    trusted through SSL_CERT_FILE, skopeo gets the exact bytes; with only
    the system's trust store, the pull fails rather than trusting it.
    """
    from tests.integration.clients import dir_digests, skopeo_pull

    key, cert = _self_signed(tmp_path)
    front = Server(tmp_path / "front", tls=(key, cert), upstream=hub.registry_url).start()
    try:
        upstream = f"https://127.0.0.1:{front.port}"
        trusting = regcache(upstream=upstream, credentials=False, env={"SSL_CERT_FILE": str(cert)})
        r = skopeo_pull(f"{trusting.host}/library/multi:1", str(tmp_path / "out"))
        assert r.returncode == 0, r.stderr
        image = images["library/multi:1"]
        expected = {b.digest.split(":")[1]: b.digest.split(":")[1] for b in image.blobs()}
        expected["manifest.json"] = image.digest.split(":")[1]
        assert dir_digests(str(tmp_path / "out")) == expected
        doubting = regcache(upstream=upstream, credentials=False)
        status, _, body = doubting.get("/v2/library/multi/manifests/1")
        assert status == 503 and b"errors" in body
    finally:
        front.stop()
