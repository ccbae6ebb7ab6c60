# test-case-name: tests.integration.test_request_bodies
"""
A real regcache process refuses request bodies at their headers: a push
that announces 1e11 bytes gets its 413 at once, its connection is closed,
and no byte of the body is spooled anywhere (the process holds no temp
file, nothing lands under the storage).
"""

import json
import os
import socket

PUSH = (b"PUT /v2/library/a/blobs/uploads/x?digest=sha256:00 HTTP/1.1\r\nHost: regcache.test\r\n"
        b"Content-Length: 100000000000\r\n\r\n")


def spools(pid: int):
    """The process's descriptors on files that are not its storage, sockets, pipes or devices: a spooled body."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/tmp") or target.endswith("(deleted)"):
            found.append(target)
    return found


def response(sock) -> bytes:
    """Everything the server sends until it closes the connection (a 30 s deadline keeps a hang from hanging the run)."""
    sock.settimeout(30)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


def test_huge_push_is_refused_before_its_body(regcache):
    """
    The 413 and the close come right after the headers, with 300 KiB of
    body already sent behind them; the process spools none of it.
    """
    server = regcache()
    before = spools(server.proc.pid)
    sock = socket.create_connection(("127.0.0.1", server.port))
    with sock:
        sock.sendall(PUSH)
        try:
            sock.sendall(b"x" * (300 * 1024))
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw = response(sock)
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
    error = json.loads(raw.split(b"\r\n\r\n", 1)[1])["errors"][0]
    assert error["code"] == "UNSUPPORTED"
    assert spools(server.proc.pid) == before
    assert not os.listdir(os.path.join(server.storage, "tmp"))
    status, _, _ = server.get("/healthz")
    assert status == 200
