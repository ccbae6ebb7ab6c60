# test-case-name: tests.integration.test_client_limits_proc
"""
The client limits of a real regcache process, probed as an attacker would:
slowloris connections, readers that stop, more connections than the cap.
Each is turned away, counted, and leaves health checks answering and no
descriptor behind.
"""

import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from tests.integration.test_descriptors_proc import census
from tests.integration.procs import wait_for


def health(rc) -> int:
    with urllib.request.urlopen(rc.url + "/healthz", timeout=10) as r:
        return r.status


def metric(rc, name: str) -> float:
    with urllib.request.urlopen(rc.url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def closed(s: socket.socket) -> bool:
    """Whether the server has closed ``s`` (what it sent first is read and dropped)."""
    s.settimeout(0.05)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except socket.timeout:
        return False
    except ConnectionError:
        return True


def test_slowloris_connections_are_cut_at_the_header_deadline(regcache):
    """
    Twenty connections that send a header byte every half second are all
    closed once their headers are two seconds late, while /healthz answers
    throughout; the process raised its open-file limit to the hard limit.
    """
    rc = regcache("--client-header-timeout", "2s")
    with open(f"/proc/{rc.proc.pid}/limits") as f:
        row = next(line for line in f if line.startswith("Max open files")).split()
    assert row[3] == row[4], f"soft {row[3]} != hard {row[4]}"
    socks = [socket.create_connection(("127.0.0.1", rc.port)) for _ in range(20)]
    for s in socks:
        s.sendall(b"GET /v2/ HTTP/1.1\r\n")

    def drip():
        """Another header byte on each connection, with /healthz answering meanwhile: all closed yet?"""
        if all(closed(s) for s in socks):
            return True
        for s in socks:
            try:
                s.send(b"X")
            except OSError:
                pass
        assert health(rc) == 200
        time.sleep(0.5)
        return False

    wait_for(drip, 30, "the slowloris connections to be closed")
    for s in socks:
        s.close()
    assert metric(rc, 'regcache_client_limits_total{limit="head_timeout"}') == 20


def test_readers_that_stop_are_dropped_and_give_their_descriptors_back(regcache, images, tmp_path):
    """
    Clients that read part of a large blob and then stop reading are
    disconnected after the progress timeout, and the process's descriptors
    (blob files, client sockets) come back to what they were.
    """
    storage = str(tmp_path / "store")
    rc = regcache("--client-progress-timeout", "1s", storage=storage)
    port = urlsplit(rc.url).port
    layer = images["library/large:1"].layers[0]
    path = f"/v2/library/large/blobs/{layer.digest}"
    with urllib.request.urlopen(rc.url + path, timeout=60) as r:
        assert len(r.read()) == layer.size
    wait_for(lambda: census(rc.proc.pid, storage, port)[:2] == ([], 0), 30, "the warm-up to settle")
    before = census(rc.proc.pid, storage, port)[2]
    readers = []
    for _ in range(10):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", rc.port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        s.recv(1024)
        readers.append(s)
    wait_for(lambda: metric(rc, 'regcache_client_limits_total{limit="progress_timeout"}') == 10, 30,
             "every stopped reader to be dropped")
    for s in readers:
        s.close()
    wait_for(lambda: census(rc.proc.pid, storage, port)[:2] == ([], 0)
             and census(rc.proc.pid, storage, port)[2] == before, 30, "descriptors to come back")
    assert health(rc) == 200


def test_past_the_connection_cap_requests_are_refused_but_health_answers(regcache):
    """
    With the cap reached by idle connections, a pull request gets 503 and
    Retry-After, and /healthz still answers 200.
    """
    rc = regcache("--max-connections", "5")
    held = [socket.create_connection(("127.0.0.1", rc.port)) for _ in range(5)]
    answers = []

    def refused():
        try:
            urllib.request.urlopen(rc.url + "/v2/", timeout=10).close()
        except urllib.error.HTTPError as e:
            answers[:] = [e]
            return e.code == 503
        return False

    wait_for(refused, 10, "a request past the cap to be refused")
    assert answers[0].headers["Retry-After"] == "1"
    assert health(rc) == 200
    for s in held:
        s.close()
    wait_for(lambda: not refused(), 10, "requests to be served once the held connections close")
    assert metric(rc, 'regcache_client_limits_total{limit="max_connections"}') >= 2


def test_stalled_readers_cannot_exhaust_a_small_descriptor_limit(regcache, images):
    """
    With 256 descriptors in all, 100 clients that read a little of a large
    blob and stop (once enough to reset every connection, /healthz
    included) are held to the connection cap the limit allows: past it
    they get 503, /healthz still answers 200 throughout, and once they are
    gone a pull is served again.
    """
    rc = regcache("--client-progress-timeout", "30s", open_files=256)
    layer = images["library/large:1"].layers[0]
    path = f"/v2/library/large/blobs/{layer.digest}"
    with urllib.request.urlopen(rc.url + path, timeout=60) as r:
        assert len(r.read()) == layer.size
    readers, refused = [], 0
    for _ in range(100):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", rc.port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        head = s.recv(1024)
        refused += head.startswith(b"HTTP/1.1 503 ")
        readers.append(s)
        assert health(rc) == 200
    assert refused > 0, "the cap never engaged"
    for s in readers:
        s.close()

    def served():
        try:
            with urllib.request.urlopen(rc.url + path, timeout=60) as r:
                return len(r.read()) == layer.size
        except urllib.error.HTTPError:
            return False

    wait_for(served, 30, "a pull to be served once the readers are gone")
    assert metric(rc, 'regcache_client_limits_total{limit="max_connections"}') >= refused
