# test-case-name: tests.integration.test_hostile
"""
Fifty thousand hostile requests against a real regcache process in
front of the fake Hub: distinct missing tags, random Accept values, random
paths and methods.  Whatever clients send, what regcache keeps (memory,
files, metric series) must stop growing once the kinds of request have all
been seen.

The requests are pipelined over several keep-alive connections from one
thread with a selector, so the client costs little next to the server.
"""

import os
import random
import selectors
import socket
import urllib.request
from collections import Counter

from regcache.manifests import MANIFEST_MEDIA_TYPES

TOTAL = 50_000
WARM_UP = 10_000
CONNECTIONS = 6
#: Requests in flight per connection.
WINDOW = 32

#: What the run may add after the warm-up, and what it may hold at the end:
#: a leak of some 100 bytes a request reaches RSS_GROWTH over the 40,000 after it.
RSS_GROWTH = 4 * 1024 * 1024
MAX_FILES = 80
MAX_SERIES = 300

#: What dockerd asks for.
DOCKERD = ", ".join(MANIFEST_MEDIA_TYPES[:4])


def hostile(rng: random.Random, i: int):
    """The i-th request: (method, raw bytes)."""
    roll = rng.random()
    headers = {}
    if roll < 0.03:
        # A tag upstream does not have: one upstream HEAD each.
        method, path = "GET", f"/v2/library/small/manifests/gone-{i}"
        headers["Accept"] = DOCKERD
    elif roll < 0.35:
        # The one real tag, each time with an Accept of its own: a random
        # subset of the manifest types among junk, or junk only.
        method, path = "HEAD", "/v2/library/small/manifests/1"
        types = [t for t in MANIFEST_MEDIA_TYPES if rng.random() < 0.3] + [f"application/x-{rng.getrandbits(40):x}"]
        rng.shuffle(types)
        headers["Accept"] = ", ".join(types)
    elif roll < 0.65:
        # A distinct missing tag with an Accept naming no manifest type.
        method, path = rng.choice(["GET", "HEAD"]), f"/v2/library/small/manifests/t{i}"
        headers["Accept"] = f"text/x-{rng.getrandbits(40):x}"
    else:
        method = rng.choice(["GET", "HEAD", "POST", "DELETE", "OPTIONS", f"X{rng.getrandbits(32):X}"])
        path = rng.choice([
            f"/{rng.getrandbits(64):x}",
            f"/v2/{rng.getrandbits(64):x}",
            f"/v2/Library/{rng.getrandbits(64):x}/manifests/1",
            f"/v2/library/small/nothing/{rng.getrandbits(64):x}",
            f"/metrics/{rng.getrandbits(64):x}",
        ])
    lines = [f"{method} {path} HTTP/1.1", "Host: regcache.test"] + [f"{k}: {v}" for k, v in headers.items()]
    return method, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Connection:
    """One keep-alive connection with up to WINDOW pipelined requests in flight."""

    def __init__(self, port: int, requests):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.todo = requests
        self.sent = 0
        self.waiting = []
        self.out = b""
        self.buf = b""
        self.statuses = Counter()

    @property
    def done(self) -> bool:
        return self.sent == len(self.todo) and not self.waiting and not self.out

    def fill(self) -> None:
        while self.sent < len(self.todo) and len(self.waiting) < WINDOW:
            method, raw = self.todo[self.sent]
            self.sent += 1
            self.waiting.append(method)
            self.out += raw

    def write(self) -> None:
        if self.out:
            n = self.sock.send(self.out)
            self.out = self.out[n:]

    def read(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise AssertionError(f"regcache closed a connection with {len(self.waiting)} answers owed")
        self.buf += data
        while self.waiting:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                assert name.lower() != "transfer-encoding", head
            if self.waiting[0] == "HEAD":
                length = 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.waiting.pop(0)
            self.statuses[int(head[0].split(" ")[1])] += 1


def send_all(port: int, requests) -> Counter:
    """Every request sent and answered; the statuses seen."""
    conns = [Connection(port, requests[k::CONNECTIONS]) for k in range(CONNECTIONS)]
    selector = selectors.DefaultSelector()
    for c in conns:
        c.fill()
        selector.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    open_ = len(conns)
    while open_:
        events = selector.select(timeout=60)
        assert events, "regcache stopped answering for 60 s"
        for key, mask in events:
            c = key.data
            if mask & selectors.EVENT_READ:
                c.read()
            c.fill()
            if mask & selectors.EVENT_WRITE:
                c.write()
            if c.done:
                selector.unregister(c.sock)
                c.sock.close()
                open_ -= 1
            else:
                selector.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0), c)
    total = Counter()
    for c in conns:
        total.update(c.statuses)
    return total


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def files(root: str) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def series(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return sum(1 for line in r.read().decode().splitlines() if line and not line.startswith("#"))


def test_hostile_requests_leave_state_bounded(regcache, hub):
    """
    After a warm-up that has sent every kind of request, 50,000 hostile
    requests in all leave regcache's RSS within RSS_GROWTH of what it was,
    at most MAX_FILES files under its storage and MAX_SERIES metric series;
    the real tag cost at most one upstream HEAD per accept key (63 in all,
    one of them checked before), every request was answered, and none
    with a 5xx.
    """
    # A window longer than the run, and a header timeout no load reaches:
    # the real tag is checked once per key, never retried.
    server = regcache("--tag-ttl", "1h", "--header-timeout", "60s")
    # Learn upstream's challenge and token first, so the HEADs counted
    # below are the mirror's tag checks, not 401s racing for a token.
    status, _, _ = server.get("/v2/library/small/manifests/1", "HEAD", headers={"Accept": DOCKERD})
    assert status == 200
    primed = hub.stats()["manifest_heads_by_ref"]["library/small:1"]
    rng = random.Random(1009)
    requests = [hostile(rng, i) for i in range(TOTAL)]
    seen = send_all(server.port, requests[:WARM_UP])
    warm = rss(server.proc.pid)
    seen.update(send_all(server.port, requests[WARM_UP:]))
    grown = rss(server.proc.pid) - warm
    held, metric_series = files(server.storage), series(server.url)
    print(f"\nhostile: RSS {warm} + {grown} bytes, {held} files, {metric_series} series, statuses {dict(seen)}")
    assert sum(seen.values()) == TOTAL
    assert not [s for s in seen if s >= 500], seen
    assert grown < RSS_GROWTH, f"RSS grew by {grown} bytes after the warm-up"
    assert held <= MAX_FILES, f"{held} files under {server.storage}"
    assert metric_series <= MAX_SERIES, f"{metric_series} metric series"
    checks = hub.stats()["manifest_heads_by_ref"]["library/small:1"] - primed
    assert checks <= 62, f"{checks} upstream HEADs of library/small:1 for 62 other accept keys"
