# test-case-name: tests.integration.test_descriptors_proc
"""
A real regcache process keeps no descriptor of a blob response once the
response is over, whatever the client sent and however it left: counted in
/proc/PID/fd before and after a battery of hostile requests on a cached blob
and on one still downloading.
"""

import http.client
import re
import socket
from collections import Counter
from urllib.parse import urlsplit

from tests.integration.procs import wait_for
from tests.test_descriptors import descriptors

HUGE = "9" * 4400

#: Range values that refuse, clip, ignore or break a parser.
RANGES = [
    f"bytes={HUGE}-", f"bytes=0-{HUGE}", f"bytes=-{HUGE}", f"bytes={HUGE}-{HUGE}", f"bytes=-{HUGE}0",
    "bytes=5-3", "bytes=500-0", "bytes=-0", "bytes=999999999-", "bytes=abc", "bytes=--1",
    "bytes=0-1,5-9", "items=0-1", "bytes=1000-1499", "bytes=0-", "bytes=-1",
]


def _tcp_sockets():
    """Every TCP socket of this host: inode -> (local port, remote port, listening)."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
            sockets[fields[9]] = (local, remote, fields[3] == "0A")
    return sockets


def census(pid: int, storage: str, port: int):
    """
    The process's descriptors as (files under the storage, client
    connections, everything else by kind).  Connections to upstream are
    left out: the connection pool keeps as many as it sees fit.
    """
    sockets = _tcp_sockets()
    root = storage.rstrip("/") + "/"
    files, clients, rest = [], 0, Counter()
    for target in descriptors(pid):
        if target.startswith(root):
            files.append(target)
        elif target.startswith("socket:["):
            local, remote, listening = sockets.get(target[len("socket:["):-1], (0, 0, False))
            if local == port and not listening:
                clients += 1
            elif listening or not remote:
                rest["socket"] += 1
        else:
            rest[target.split(":")[0]] += 1
    return files, clients, rest


def exchange(rc, request: bytes, read: int = 0) -> bytes:
    """
    Send one raw request and hang up after the response headers and up to
    ``read`` bytes of its body.
    """
    s = socket.create_connection(("127.0.0.1", rc.port), timeout=30)
    try:
        s.sendall(request)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                return got
            got += chunk
        head, body = got.split(b"\r\n\r\n", 1)
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if request.startswith(b"HEAD") or length is None:
            return got
        want = min(read, int(length.group(1)))
        while len(body) < want:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    finally:
        s.close()


def request(method: str, path: str, headers=()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: mirror"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def full(rc, path: str, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", rc.port, timeout=60)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_no_descriptor_outlives_a_blob_response(hub, regcache, images, tmp_path):
    """
    Hostile Ranges, HEADs and clients hanging up mid-body, on a cached blob
    and on a blob still downloading (and so on its temp file), and a client
    aborted by a download that failed its digest check, leave the process
    with exactly the descriptors it had before, once the download has
    landed and every connection is closed.
    """
    storage = str(tmp_path / "store")
    rc = regcache("--idle-timeout", "2s", storage=storage)
    pid = rc.proc.pid
    port = urlsplit(rc.url).port
    cached = images["library/large:1"].layers[0]
    cached_path = f"/v2/library/large/blobs/{cached.digest}"
    growing = images["library/multi:1"].layers[3]
    growing_path = f"/v2/library/multi/blobs/{growing.digest}"
    cold = images["library/multi:1"].layers[0]
    bad = images["library/multi:1"].layers[1]

    status, data = full(rc, cached_path)
    assert status == 200 and len(data) == cached.size
    wait_for(lambda: census(pid, storage, port)[:2] == ([], 0), 30, "the warm-up to settle")
    _, _, before = census(pid, storage, port)

    statuses = Counter()
    for path in (cached_path, growing_path):
        if path == growing_path:
            # The download of this one crawls 64 KiB per resume until the
            # fault is cleared: every request below meets it in flight.
            hub.fault("stall", scope="blobs", path=growing.hex, after=64 * 1024)
            exchange(rc, request("GET", path), read=1)
        # Bytes of a blob still downloading may wait for its digest check:
        # hang up after the headers there.
        read = 1 if path == cached_path else 0
        for value in RANGES:
            for method in ("GET", "HEAD"):
                answer = exchange(rc, request(method, path, [("Range", value)]), read=read)
                statuses[answer.split(b" ", 2)[1]] += 1
        exchange(rc, request("HEAD", path))
        exchange(rc, request("GET", path), read=1024 * 1024 if path == cached_path else 100)
        exchange(rc, request("GET", path))
    exchange(rc, request("HEAD", f"/v2/library/multi/blobs/{cold.digest}"))
    # A download that fails its digest check aborts its client mid-body.
    hub.fault("wrong", scope="blobs", path=bad.hex, times=1)
    aborted = exchange(rc, request("GET", f"/v2/library/multi/blobs/{bad.digest}"), read=bad.size)
    assert len(aborted.split(b"\r\n\r\n", 1)[1]) < bad.size
    exchange(rc, request("GET", cached_path, [("Range", f"bytes={HUGE}-")]) * 3)

    hub.clear_faults()
    status, data = full(rc, growing_path)
    assert status == 200 and len(data) == growing.size
    settled = []

    def clean():
        settled[:] = [census(pid, storage, port)]
        files, clients, rest = settled[0]
        return files == [] and clients == 0 and rest == before

    try:
        wait_for(clean, 30, "every response's descriptors to be closed")
    except AssertionError:
        files, clients, rest = settled[0]
        raise AssertionError(f"still open: {len(files)} store files {files[:3]}, {clients} client "
                             f"connections, others {dict(rest)} (before: {dict(before)})") from None
    assert set(statuses) <= {b"200", b"206", b"416"}, statuses
