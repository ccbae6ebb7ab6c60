# test-case-name: tests.integration.test_upstream_failures
"""
Upstreams failing on real sockets, in front of twistd regcache: a token
server that stalls mid-body does not wedge pulls, and every kind of
transport failure reaches the client as a sentence naming the upstream,
with the exception left in regcache's log.
"""

import json
import socket
import ssl
import subprocess
import threading
import time

import pytest

from tests.integration.procs import closed_port, wait_for

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"}
PATH = "/v2/library/small/manifests/1"


def error_message(body: bytes) -> str:
    """The client's OCI error message, checked to carry no exception repr."""
    message = json.loads(body)["errors"][0]["message"]
    for repr_mark in ("<", "Failure", "Error:", "Error(", "Exception"):
        assert repr_mark not in message, message
    return message


def test_stalled_token_body_does_not_wedge_pulls(hub, regcache):
    """
    The token server starts answering and then stalls, for good: a cached
    tag is served stale after the idle timeout, an uncached one fails with
    an error naming the token server, and once the server recovers a
    pull gets a token and a fresh answer, with no restart (as soon as the
    circuit the failures opened lets a probe through).
    """
    rc = regcache("--tag-ttl", "1s", "--idle-timeout", "1s", "--header-timeout", "2s")
    assert rc.get(PATH, headers=ACCEPT)[0] == 200
    hub.expire_tokens()
    hub.fault("stall", scope="token")
    time.sleep(1.1)  # past --tag-ttl, so the tag is revalidated
    status, headers, _ = rc.get(PATH, headers=ACCEPT, timeout=20)
    assert status == 200 and "Stale" in headers["Warning"]
    status, _, body = rc.get("/v2/library/multi/manifests/1", headers=ACCEPT, timeout=20)
    assert status == 503
    assert "stopped sending the token" in error_message(body)
    hub.clear_faults()

    def fresh():
        status, headers, _ = rc.get(PATH, headers=ACCEPT, timeout=20)
        return status == 200 and headers["Warning"] is None

    wait_for(fresh)
    assert rc.get("/v2/library/multi/manifests/1", headers=ACCEPT, timeout=20)[0] == 200


class RawUpstream:
    """
    An 'upstream' on loopback that misbehaves the same way on every
    connection: ``close`` hangs up on the request, ``silent`` reads it and
    never answers, ``garbage`` answers with bytes that are not HTTP, and
    ``tls`` speaks TLS with a self-signed certificate.
    """

    def __init__(self, mode: str, tmp_path):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held = []
        self.tls = None
        if mode == "tls":
            key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                           check=True, capture_output=True)
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(str(cert), str(key))
        threading.Thread(target=self.serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        try:
            if self.tls:
                # The handshake fails on the client's side; nothing more to say.
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.recv(65536)
            if self.mode == "garbage":
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            elif self.mode == "silent":
                self.held.append(conn)
                return
        except (OSError, ssl.SSLError):
            pass
        conn.close()

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("mode, words", [
    ("refused", "refused the connection"),
    ("dns", "DNS lookup of upstream regcache-test.invalid failed"),
    ("close", "closed the connection before answering"),
    ("silent", "did not answer within 1 s (--header-timeout)"),
    ("garbage", "sent a malformed HTTP response"),
    ("tls", "TLS certificate of upstream 127.0.0.1"),
])
def test_failures_reach_the_client_in_words(regcache, tmp_path, mode, words):
    """
    Each way of failing gives the client a 503 whose message says what
    happened and where, and no exception repr; the log keeps the detail.
    """
    raw = RawUpstream(mode, tmp_path) if mode in ("close", "silent", "garbage", "tls") else None
    try:
        if raw is not None:
            upstream, host = raw.url, f"127.0.0.1:{raw.port}"
        elif mode == "refused":
            port = closed_port()
            upstream, host = f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"
        else:
            upstream, host = "http://regcache-test.invalid", "regcache-test.invalid"
        rc = regcache("--header-timeout", "1s", upstream=upstream, credentials=False)
        status, _, body = rc.get(PATH, headers=ACCEPT, timeout=30)
        assert status == 503
        message = error_message(body)
        assert host in message and words in message, message
        assert words in rc.log()
    finally:
        if raw is not None:
            raw.close()


class ForeignRealmUpstream:
    """
    A registry on 127.0.0.1 whose every answer is a 401 naming a token realm
    on 127.0.0.2, where a listener that never accepts keeps every connection
    made to it in its backlog, to be counted at the end.
    """

    def __init__(self):
        self.realm = socket.socket()
        self.realm.bind(("127.0.0.2", 0))
        self.realm.listen(16)
        self.registry = socket.socket()
        self.registry.bind(("127.0.0.1", 0))
        self.registry.listen(16)
        self.url = f"http://127.0.0.1:{self.registry.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def connections(self) -> int:
        """The connections the realm's listener received (the kernel completed them unaccepted)."""
        self.realm.setblocking(False)
        count = 0
        while True:
            try:
                conn, _ = self.realm.accept()
            except BlockingIOError:
                return count
            count += 1
            conn.close()

    def serve(self):
        realm = f"http://127.0.0.2:{self.realm.getsockname()[1]}/token"
        answer = (f'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm="{realm}",service="x"\r\n'
                  "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
        while True:
            try:
                conn, _ = self.registry.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(answer)
            conn.close()

    def close(self):
        self.realm.close()
        self.registry.close()


def test_foreign_token_realm_is_never_contacted(regcache):
    """
    An upstream that names a token realm on another host gets a 503 naming
    that realm, and the realm's listener receives no connection at all, so
    the configured credentials cannot reach it.
    """
    upstream = ForeignRealmUpstream()
    try:
        rc = regcache(upstream=upstream.url)
        status, _, body = rc.get(PATH, headers=ACCEPT, timeout=20)
        assert status == 503
        message = error_message(body)
        assert "127.0.0.2" in message and "not on its own domain" in message
        assert "token realm" in rc.log()
        assert upstream.connections() == 0
    finally:
        upstream.close()
