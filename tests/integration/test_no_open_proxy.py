# test-case-name: tests.integration.test_no_open_proxy
"""
regcache is no open proxy: nothing a client sends (an absolute-URI request
line, a Host, an ``ns``, a path prefix, forwarding headers) and nothing an
upstream sends (a redirect to an address more private than its own) makes
it connect anywhere new.  A canary port counts every connection attempt.
"""

import json
import select
import socket
import urllib.error
import urllib.request

import pytest

from tests.fakes.serve import FakeHubProcess
from tests.integration.conftest import LARGE


@pytest.fixture
def canary():
    """A listening socket on loopback whose pending connections are counted, never served."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    s.setblocking(False)
    accepted = []

    def count() -> int:
        while select.select([s], [], [], 0.2)[0]:
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                break
            accepted.append(conn)
            conn.close()
        return len(accepted)

    yield s.getsockname()[1], count
    s.close()


def raw(rc, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", rc.port), timeout=30) as s:
        s.sendall(request)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_nothing_a_client_sends_makes_regcache_dial_a_new_place(regcache, canary):
    """
    Every trick that names the canary's address to regcache (absolute URI,
    Host, ns, a host prefix, percent-encoding, userinfo, forwarding
    headers) is answered from configuration alone: the canary sees no
    connection.
    """
    port, count = canary
    target = f"127.0.0.1:{port}"
    rc = regcache()
    path = "/v2/library/small/manifests/1"
    probes = [
        f"GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET {path} HTTP/1.1\r\nHost: m\r\nX-Forwarded-Host: {target}\r\nForwarded: host={target}\r\n\r\n",
        f"GET {path}?ns={target} HTTP/1.1\r\nHost: m\r\n\r\n",
        f"GET {path}?ns=localhost:{port} HTTP/1.1\r\nHost: m\r\n\r\n",
        f"GET {path}?ns=x@{target} HTTP/1.1\r\nHost: m\r\n\r\n",
        f"GET /v2/{target}/library/small/manifests/1 HTTP/1.1\r\nHost: m\r\n\r\n",
        f"GET /v2/127.0.0.1%3A{port}/library/small/manifests/1 HTTP/1.1\r\nHost: m\r\n\r\n",
        f"GET /v2/localhost:{port}/small/blobs/sha256:{'0' * 64} HTTP/1.1\r\nHost: m\r\n\r\n",
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
        f"GET //{target}/v2/ HTTP/1.1\r\nHost: m\r\n\r\n",
    ]
    for probe in probes:
        answer = raw(rc, probe.encode())
        assert answer.startswith(b"HTTP/1.1 "), (probe, answer[:100])
    assert count() == 0


def test_a_redirect_to_a_more_private_address_is_never_followed(images_dir, images, regcache, canary, tmp_path):
    """
    An upstream on loopback that redirects a blob to 0.0.0.0 (which would
    reach this host) gets a clean error naming the refusal, and the canary
    sees no connection; the manifest it names itself is still served.
    """
    port, count = canary
    with FakeHubProcess(images_dir, large_size=LARGE, extra_args=["--cdn-host", f"0.0.0.0:{port}"]) as hub:
        rc = regcache(upstream=hub.registry_url, credentials=False)
        image = images["library/small:1"]
        request = urllib.request.Request(rc.url + "/v2/library/small/manifests/1", headers={"Accept": "*/*"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200
        try:
            urllib.request.urlopen(f"{rc.url}/v2/library/small/blobs/{image.layers[0].digest}", timeout=30)
            raise AssertionError("the blob was served")
        except urllib.error.HTTPError as e:
            assert e.code in (502, 503)
            message = json.loads(e.read())["errors"][0]["message"]
        assert "will not connect" in message and "0.0.0.0 is an unusable address" in message, message
        assert count() == 0
