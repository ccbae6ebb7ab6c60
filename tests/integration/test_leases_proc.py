# test-case-name: tests.integration.test_leases_proc
"""
One upstream fetch per blob across replicas, with real processes: three
regcache replicas sharing a SeaweedFS bucket in front of the fake Docker
Hub, clients pulling the large image's blobs from all of them at once, and
the lease holder killed in the middle of the large blob.
"""

import hashlib
import json
import threading
import time
import types
import urllib.request

import pytest

from regcache.peers import PEER_HEADER, PeerAuth, peer_key
from tests.integration.procs import scrape, value, wait_for
from tests.integration.seaweed import SECRET_KEY
from tests.processes import free_port

IMAGE = "library/large:1"


@pytest.fixture
def replicas(regcache, seaweed):
    """A factory: ``replicas(n, *args)`` starts n regcache processes sharing the bucket, each advertising its port."""
    def start(n, *args):
        started = []
        for _ in range(n):
            port = free_port()
            started.append(regcache(*seaweed.regcache_args(), "--advertise", f"http://127.0.0.1:{port}", *args,
                                    env=seaweed.regcache_env(), port=port))
        return started
    return start


class Pull(threading.Thread):
    """One client's GET of one blob from one replica, hashed as it arrives (110 MiB is never held)."""

    def __init__(self, replica, name: str, digest: str, start: threading.Event):
        super().__init__(daemon=True)
        self.replica = replica
        self.url = f"{replica.url}/v2/{name}/blobs/{digest}"
        self.start_event = start
        self.received = 0
        self.digest = None
        self.error = None

    def run(self):
        self.start_event.wait()
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(self.url, timeout=120) as r:
                length = int(r.headers["Content-Length"])
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    h.update(chunk)
                    self.received += len(chunk)
            # http.client ends a read of a cut body quietly, short.
            if self.received != length:
                raise EOFError(f"{self.received} of {length} bytes")
            self.digest = "sha256:" + h.hexdigest()
        except Exception as e:  # the test looks at what each client got
            self.error = e


def _pulls(replicas, image, clients):
    go = threading.Event()
    pulls = [Pull(replicas[i % len(replicas)], "library/large", b.digest, go)
             for i in range(clients) for b in image.blobs()]
    for p in pulls:
        p.start()
    return go, pulls


def _total(replicas, name, **labels):
    return sum(value(scrape(r.url), name, **labels) for r in replicas)


def test_eight_clients_on_three_replicas_cause_one_upstream_get_per_blob(replicas, hub, images):
    """
    Eight clients pulling the large image's blobs at once, spread over three
    replicas, make upstream send each blob exactly once, and every client
    gets the blob's own bytes: one replica took the lease, the others
    forwarded to it.
    """
    reps = replicas(3)
    image = images[IMAGE]
    go, pulls = _pulls(reps, image, 8)
    go.set()
    for p in pulls:
        p.join(300)
    assert [(p.url, p.error) for p in pulls if p.error is not None] == []
    assert [p.digest for p in pulls] == [p.url.rsplit("/", 1)[1] for p in pulls]
    gets = hub.stats()["cdn_blob_gets"]
    assert {b.digest: gets.get(b.digest, 0) for b in image.blobs()} == {b.digest: 1 for b in image.blobs()}
    # A claim may also be won just after the holder shared the blob and let
    # its lease go: that one reads the bucket (the GETs above are still one).
    assert _total(reps, "regcache_leases_total", result="won") >= len(image.blobs())
    assert _total(reps, "regcache_forwards_total", direction="sent", result="ok") >= 1
    assert _total(reps, "regcache_coordinator_fallbacks_total", reason="unavailable") == 0


def test_a_killed_holder_is_taken_over_and_no_client_gets_wrong_bytes(replicas, hub, images):
    """
    With the lease holder killed with SIGKILL in the middle of the large
    blob, another replica takes the lease over once it expired and finishes
    the download: the clients of the surviving replicas get the right
    bytes, upstream sends the blob at most twice, and the replica that
    took over shares it.
    """
    a, b, c = replicas(3, "--lease-ttl", "3s")
    image = images[IMAGE]
    layer = max(image.blobs(), key=lambda blob: blob.size)
    # About 8 MiB a second: the kill lands well inside the 110 MiB.
    hub.fault("drip", "blobs", path=layer.digest.split(":")[1], chunk=256 * 1024, interval=0.03)
    go = threading.Event()
    first = Pull(a, "library/large", layer.digest, go)
    first.start()
    go.set()
    wait_for(lambda: value(scrape(a.url), "regcache_leases_total", result="won") == 1, what="A to take the lease")
    wait_for(lambda: first.received > 0, what="A's client to get bytes")
    others = [Pull(r, "library/large", layer.digest, go) for r in (b, c, b, c)]
    for p in others:
        p.start()
    wait_for(lambda: all(p.received > 0 for p in others), what="B's and C's clients to get bytes from A")
    assert value(scrape(b.url), "regcache_forwards_total", direction="sent", result="ok") >= 1
    assert value(scrape(c.url), "regcache_forwards_total", direction="sent", result="ok") >= 1
    a.kill()
    for p in others:
        p.join(300)
    first.join(60)
    assert [p.error for p in others] == [None] * len(others)
    assert {p.digest for p in others} == {layer.digest}
    # A's own client may have failed with it, but never with other bytes.
    assert first.error is not None or first.digest == layer.digest
    assert hub.stats()["cdn_blob_gets"][layer.digest] <= 2
    assert _total((b, c), "regcache_leases_total", result="taken_over") == 1
    # The replica that took over fetched it, so it shares it as well.
    wait_for(lambda: _total((b, c), "regcache_shared_uploads_total", kind="blob", result="uploaded") == 1,
             what="the blob to reach the bucket from the replica that took over")


def test_the_peer_route_serves_only_signed_requests_and_never_fetches(replicas, hub, images):
    """
    The route between replicas answers 403 in OCI JSON without a valid
    signature; with one, it serves a blob the replica holds (Range too),
    and a 404 for one it neither holds nor downloads, asking nobody for it.
    """
    (a,) = replicas(1)
    held = images["library/small:1"].blobs()[0]
    other = images["library/multi:1"].blobs()[0]
    status, _, _ = a.get(f"/v2/library/small/blobs/{held.digest}")
    assert status == 200
    signer = PeerAuth(peer_key(SECRET_KEY), types.SimpleNamespace(seconds=time.time))
    stranger = PeerAuth(peer_key("not the bucket's secret"), types.SimpleNamespace(seconds=time.time))
    path = f"/_regcache/blobs/{held.digest}"
    for headers in ({}, {PEER_HEADER: stranger.sign(held.digest)}, {PEER_HEADER: signer.sign(other.digest)}):
        status, got, body = a.get(path, headers=headers)
        assert (status, got["Content-Type"], json.loads(body)["errors"][0]["code"]) == (403, "application/json",
                                                                                         "DENIED")
    status, _, body = a.get(path, headers={PEER_HEADER: signer.sign(held.digest)})
    assert (status, "sha256:" + hashlib.sha256(body).hexdigest()) == (200, held.digest)
    status, got, tail = a.get(path, headers={PEER_HEADER: signer.sign(held.digest), "Range": "bytes=100-"})
    assert (status, tail, got["Content-Range"]) == (206, body[100:], f"bytes 100-{held.size - 1}/{held.size}")
    before = hub.stats()
    status, _, body = a.get(f"/_regcache/blobs/{other.digest}", headers={PEER_HEADER: signer.sign(other.digest)})
    assert (status, json.loads(body)["errors"][0]["code"]) == (404, "BLOB_UNKNOWN")
    after = hub.stats()
    assert [s.get(other.digest, 0) for s in (after["cdn_blob_gets"], after["registry_blob_heads"])] == [0, 0]
    assert after["manifest_heads_total"] == before["manifest_heads_total"]
    assert value(scrape(a.url), "regcache_forwards_total", direction="served", result="denied") == 3
    assert value(scrape(a.url), "regcache_forwards_total", direction="served", result="missing") == 1


def test_leases_in_redis_give_one_upstream_get_per_blob_and_redis_down_fails_no_pull(replicas, redis_server, hub,
                                                                                      images):
    """
    With --redis the leases live in Redis: clients spread over three
    replicas cause one upstream GET per blob, and the leases are gone
    from Redis once released.  With Redis killed, a cold pull still
    succeeds: the replica fetches alone, and says so.
    """
    reps = replicas(3, "--redis", redis_server.url)
    image = images["library/multi:1"]
    go = threading.Event()
    pulls = [Pull(reps[i % 3], "library/multi", b.digest, go) for i in range(6) for b in image.blobs()]
    for p in pulls:
        p.start()
    go.set()
    for p in pulls:
        p.join(300)
    assert [(p.error, p.digest) for p in pulls] == [(None, p.url.rsplit("/", 1)[1]) for p in pulls]
    gets = hub.stats()["cdn_blob_gets"]
    assert {b.digest: gets.get(b.digest, 0) for b in image.blobs()} == {b.digest: 1 for b in image.blobs()}
    # A claim may also be won just after the holder shared the blob and let
    # its lease go: that one reads the bucket (the GETs above are still one).
    assert _total(reps, "regcache_leases_total", result="won") >= len(image.blobs())
    wait_for(lambda: redis_server.keys("regcache:leases/*") == [], what="the leases to be released")
    redis_server.kill()
    small = images["library/small:1"].blobs()[0]
    lone = Pull(reps[1], "library/small", small.digest, go)
    lone.run()
    assert (lone.error, lone.digest) == (None, small.digest)
    assert value(scrape(reps[1].url), "regcache_coordinator_fallbacks_total", reason="unavailable") == 1
