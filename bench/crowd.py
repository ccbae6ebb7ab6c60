"""
Many clients at once, from a load generator small enough to hold them all.

curl is one process per client and wrk repeats requests; the issue's crowd
is N clients that each fetch one blob once.  This client forks a few worker
processes (one per core: a single Python process would be the bottleneck),
each holding its share of the connections on non-blocking sockets with one
``selectors`` loop, reading bodies into one reused buffer and throwing the
bytes away, like curl to /dev/null.

- ``fetch``: every connection sends one GET at the same moment (the workers
  wait on one Event) and reads the whole body; a connection that
  fails, gets another status or another length is an error.  Aggregate is
  all bytes over the wall-clock from the first request sent to the last
  byte received; fairness is the slowest client's speed over the median's.
- ``idle``: connections that each make one small request with keep-alive,
  then hold the connection idle; reports how many the server closed and
  when, so the bench can watch its memory while they are held and after
  its idle timeout let them go.

Every wait is bounded by ``timeout``.
"""

import os
import selectors
import socket
import time
from multiprocessing import get_context
from typing import Dict, List
from urllib.parse import urlsplit

from bench.measure import median

BUFFER = 1 << 20


def _request(url: str, keep_alive: bool) -> tuple:
    u = urlsplit(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    head = (f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return (u.hostname, u.port or 80), head.encode()


class _Conn:
    __slots__ = ("sock", "sent", "head", "length", "got", "status", "done", "error", "closed_at")

    def __init__(self, sock):
        self.sock = sock
        self.sent = 0.0
        self.head = b""
        self.length = None
        self.got = 0
        self.status = None
        self.done = 0.0
        self.error = None
        self.closed_at = 0.0


def _open(addr, n: int) -> List[_Conn]:
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)  # bounded memory on both sides
        s.setblocking(False)
        s.connect_ex(addr)
        conns.append(_Conn(s))
    return conns


def _headers(c: _Conn, data: bytes) -> bytes:
    """Parse the status line and Content-Length once the head is complete; returns body bytes."""
    c.head += data
    end = c.head.find(b"\r\n\r\n")
    if end < 0:
        if len(c.head) > 65536:
            c.error = "headers too long"
        return b""
    head, rest = c.head[:end], c.head[end + 4:]
    lines = head.split(b"\r\n")
    c.status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            c.length = int(value.strip())
    if c.length is None:
        c.error = "no Content-Length"
    return rest


def _fetch_worker(url: str, n: int, timeout: float, go, results) -> None:
    addr, req = _request(url, keep_alive=False)
    conns = _open(addr, n)
    sel = selectors.DefaultSelector()
    go.wait()
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    for c in conns:
        sel.register(c.sock, selectors.EVENT_WRITE, c)
    deadline = time.monotonic() + timeout
    live = n
    while live and time.monotonic() < deadline:
        for key, ev in sel.select(timeout=1.0):
            c = key.data
            if ev & selectors.EVENT_WRITE:
                try:
                    c.sock.send(req)  # a few dozen bytes: one send
                except OSError as e:
                    c.error = f"send: {e}"
                else:
                    c.sent = time.monotonic()
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
            else:
                try:
                    k = c.sock.recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError as e:
                    c.error = f"recv: {e}"
                    k = -1
                if k == 0:
                    c.error = c.error or "closed early"
                elif k > 0:
                    if c.length is None:
                        c.got += len(_headers(c, bytes(view[:k])))
                    else:
                        c.got += k
                    if c.length is not None and c.got >= c.length:
                        c.done = time.monotonic()
                        if c.got > c.length:
                            c.error = "too many bytes"
            if c.error or c.done:
                sel.unregister(c.sock)
                c.sock.close()
                live -= 1
    for c in conns:
        if not (c.error or c.done):
            c.error = "timed out"
            c.sock.close()
    results.send([(c.sent, c.done, c.got, c.status, c.error) for c in conns])


def _idle_worker(url: str, n: int, hold: float, go, results) -> None:
    addr, req = _request(url, keep_alive=True)
    conns = _open(addr, n)
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_WRITE, c)
    go.wait()
    deadline = time.monotonic() + hold
    live = n
    while live and time.monotonic() < deadline:
        for key, ev in sel.select(timeout=0.5):
            c = key.data
            if ev & selectors.EVENT_WRITE:
                try:
                    c.sock.send(req)
                    c.sent = time.monotonic()
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                except OSError as e:
                    c.error = f"send: {e}"
                    sel.unregister(c.sock)
                    live -= 1
                continue
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                c.closed_at = time.monotonic()
                sel.unregister(c.sock)
                live -= 1
            elif not c.done:
                c.got += len(_headers(c, data)) if c.length is None else len(data)
                if c.length is not None and c.got >= c.length:
                    c.done = time.monotonic()
    for c in conns:
        c.sock.close()
    results.send([(c.sent, c.done, c.closed_at, c.status, c.error) for c in conns])


def _run(target, url: str, n: int, limit: float, workers: int):
    ctx = get_context("fork")
    go = ctx.Event()  # one for all: several readers of one Pipe can split a message
    pipes, procs = [], []
    shares = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    for share in shares:
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=target, args=(url, share, limit, go, w), daemon=True)
        p.start()
        pipes.append(r)
        procs.append(p)
    return go, pipes, procs


def _gather(pipes, procs, limit: float) -> list:
    rows = []
    for r, p in zip(pipes, procs):
        if r.poll(limit + 30):
            rows += r.recv()
        p.join(10)
        if p.is_alive():
            p.kill()
    return rows


def fetch(url: str, n: int, size: int, timeout: float = 120, workers: int = 0) -> Dict[str, float]:
    """``n`` clients each GET ``url`` (``size`` bytes) once, all at the same moment."""
    workers = workers or os.cpu_count() or 1
    go, pipes, procs = _run(_fetch_worker, url, n, timeout, workers)
    time.sleep(0.5 + n / 2000)  # let every worker open its sockets
    go.set()
    rows = _gather(pipes, procs, timeout)
    ok = [(s, d, g) for s, d, g, status, err in rows if not err and status == 200 and g == size]
    errors = n - len(ok)
    first = min((s for s, _, _, _, _ in rows if s), default=0.0)
    last = max((d for _, d, _, _, _ in rows if d), default=first)
    speeds = [g / (d - s) for s, d, g in ok if d > s]
    wall = last - first
    kinds = sorted({err for *_, err in rows if err})
    return {"clients": n, "errors": errors, "error_kinds": kinds[:5],
            "aggregate": sum(g for _, _, g in ok) / wall if wall > 0 else 0.0, "wall_s": wall,
            "fairness": min(speeds) / median(speeds) if speeds else 0.0,
            "slowest": min(speeds, default=0.0), "median": median(speeds) or 0.0}


def idle(url: str, n: int, hold: float, workers: int = 0, during=None) -> Dict[str, float]:
    """
    ``n`` keep-alive connections each make one request of ``url``, then sit
    idle for up to ``hold`` seconds; ``during()`` runs while they are held.
    Returns how many got their answer, how many the server closed, and the
    seconds from the request to the close (median, max).
    """
    workers = workers or os.cpu_count() or 1
    go, pipes, procs = _run(_idle_worker, url, n, hold, workers)
    time.sleep(0.5 + n / 2000)
    go.set()
    seen = during() if during is not None else None
    rows = _gather(pipes, procs, hold)
    answered = sum(1 for _, d, _, status, _ in rows if d and status == 200)
    closes = [c - s for s, _, c, _, _ in rows if c and s]
    return {"clients": n, "answered": answered, "closed_by_server": len(closes),
            "close_after_s_median": median(closes), "close_after_s_max": max(closes, default=None),
            "during": seen}
