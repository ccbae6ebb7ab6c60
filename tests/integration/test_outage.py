# test-case-name: tests.integration.test_outage
"""
Outage insurance with real processes: twistd regcache, holding the team's
Hub credentials, keeps serving what it has when the (fake) Hub rate-limits,
goes down or black-holes requests, and never caches what a lying upstream
sends.
"""

import hashlib
import socket
import threading

import pytest

from tests.integration.clients import dir_digests, skopeo_pull
from tests.integration.procs import wait_for


def counters(hub):
    s = hub.stats()
    return s["manifest_gets_total"], s["cdn_blob_gets_total"]


@pytest.mark.parametrize("outage", ["429", "down"])
def test_second_pull_survives_outage(hub, regcache, images, tmp_path, outage):
    """
    skopeo pulls a private image through regcache (which holds the
    credentials); the Hub then answers 429 or refuses connections; a second
    skopeo pull of the same tag still succeeds, with nothing fetched
    upstream, and the tag is marked stale.
    """
    rc = regcache("--tag-ttl", "0")
    r = skopeo_pull(f"{rc.host}/ci/private:1", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    before = counters(hub)
    if outage == "429":
        hub.fault("status", scope="all", status=429)
    else:
        hub.down("all")
    r = skopeo_pull(f"{rc.host}/ci/private:1", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "b")) == dir_digests(str(tmp_path / "a"))
    if outage == "429":
        assert counters(hub) == before
    status, headers, _ = rc.get("/v2/ci/private/manifests/1", headers={"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"})
    assert status == 200 and "Stale" in headers["Warning"]


def test_black_holed_upstream_serves_the_cached_tag(hub, regcache, tmp_path):
    """
    With upstream accepting connections and never answering: inside the
    tag window the cached manifest is served fresh with no upstream request
    at all; outside it (a restart with a zero window, on the same storage)
    one HEAD goes upstream, the cached manifest is served with the Warning
    header at the revalidate deadline, and the HEAD, left to go on, is
    given up at the header timeout, which the log says.  An answer while
    upstream never answers is the proof that nothing waited for it.
    """
    storage = str(tmp_path / "store")
    path = "/v2/library/small/manifests/1"
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    rc = regcache("--tag-ttl", "1h", "--header-timeout", "1s", storage=storage)
    status, _, cached = rc.get(path, headers=accept)
    assert status == 200
    hub.fault("hang", scope="all")
    before = counters(hub), hub.stats()["manifest_heads_total"]
    status, headers, body = rc.get(path, headers=accept, timeout=30)
    assert (status, body, headers["Warning"]) == (200, cached, None)
    assert (counters(hub), hub.stats()["manifest_heads_total"]) == before
    rc.stop()
    rc = regcache("--tag-ttl", "0", "--header-timeout", "1s", storage=storage)
    status, headers, body = rc.get(path, headers=accept, timeout=30)
    assert (status, body) == (200, cached)
    assert "Stale" in headers["Warning"]
    assert counters(hub) == before[0]
    assert hub.stats()["manifest_heads_total"] == before[1] + 1
    fallback = [line for line in rc.log().splitlines() if "Serving library/small:1 from cache" in line]
    assert len(fallback) == 1 and "upstream failed: upstream 127.0.0.1" in fallback[0], fallback
    assert "did not confirm the tag within 300 ms (--revalidate-deadline)" in fallback[0], fallback
    wait_for(lambda: "did not answer within 1 s (--header-timeout)" in rc.log())


def test_reset_mid_body_is_resumed(hub, regcache, images):
    """
    A CDN connection reset half-way through a blob is resumed with Range;
    the client sees one continuous, correct body.
    """
    rc = regcache()
    blob = images["library/large:1"].layers[0]
    hub.fault("reset", scope="blobs", times=1)
    status, _, body = rc.get(f"/v2/library/large/blobs/{blob.digest}")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == blob.digest.split(":")[1]
    assert sum(hub.stats()["cdn_range_gets"].values()) >= 1


def test_wrong_bytes_fail_the_client_and_are_not_cached(hub, regcache, images):
    """
    An upstream that sends other bytes of the right length: the client's
    transfer fails (it never gets a complete body), nothing is cached, and
    once upstream behaves the blob is fetched again and correct.
    """
    rc = regcache()
    blob = images["library/multi:1"].layers[0]
    hub.fault("wrong", scope="blobs")
    s = socket.create_connection(("127.0.0.1", rc.port))
    s.sendall(f"GET /v2/library/multi/blobs/{blob.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = b""
    s.settimeout(30)
    try:
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            received += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert not (head.startswith(b"HTTP/1.1 200") and len(body) >= blob.size)
    hub.clear_faults()
    status, _, body = rc.get(f"/v2/library/multi/blobs/{blob.digest}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == blob.digest.split(":")[1]
    assert hub.stats()["cdn_blob_gets"][blob.digest] == 2


class GarbageServer:
    """An 'upstream' that answers every connection with bytes that are not HTTP."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\x00\x01garbage\r\n\r\nzzz")
            finally:
                conn.close()


def test_garbage_headers_are_an_upstream_error(regcache, tmp_path):
    """
    An upstream that answers with garbage headers gives the client a clear
    OCI error, caches nothing, and regcache keeps serving.
    """
    g = GarbageServer()
    try:
        rc = regcache(upstream=f"http://127.0.0.1:{g.port}", credentials=False)
        status, _, body = rc.get("/v2/library/small/blobs/sha256:" + "a" * 64)
        assert status in (502, 503) and b"errors" in body
        status, _, body = rc.get("/v2/library/small/manifests/1")
        assert status in (502, 503) and b"errors" in body
        assert rc.get("/v2/")[0] == 200
    finally:
        g.stop = True
        g.sock.close()
