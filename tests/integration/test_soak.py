# test-case-name: tests.integration.test_soak
"""
The soak: a real regcache in front of the fake Docker Hub, a small cache
(eviction all the time), concurrent skopeo pulls and raw HTTP clients (slow
readers, readers that hang up, slowloris connections), while the test
injects a 429 storm, resets mid-blob and one ``kill -9`` with a restart.

At the end: every completed pull and every fully read blob is
byte-identical to upstream, ``regcache verify`` finds nothing corrupt, a
clean pull of every image still works, RSS and descriptors before, during
and after are printed and bounded, upstream blob fetches are the distinct
blobs plus only what evictions, injected faults and the kill explain, and
no secret appears in a log line, a metric or the status page.

The fetch bound counts each cause once: a first fetch per blob, one per
eviction (counted by regcache until the kill, and the blob files an
eviction under way at the kill deleted), one per reset injected, one per
fill the kill left unfinished, and the GETs the storm's CDN answered 429.
Those last are bounded too: regcache pauses at the first 429 and then
probes once per pause, so only the fills already under way (one per
blob) and the probes can be refused; a regcache that ignored the blob
host's 429 sent one GET for every client asking for a missing blob.

``REGCACHE_SOAK_SECONDS`` (default 60) sets how long the clients run, and
``REGCACHE_SOAK_MAX_SIZE`` (default 12Mi) the cache's size: smaller makes
the eviction churn extreme.
"""

import base64
import concurrent.futures
import hashlib
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from typing import Dict, List, Set

from regcache.health import ABUSE_FIRST

from tests.integration.clients import dir_digests, expected_files, skopeo_pull
from tests.integration.conftest import USERS
from tests.integration.procs import REPO, wait_for
from tests.integration.test_hostile import rss

SECONDS = float(os.environ.get("REGCACHE_SOAK_SECONDS", "60"))
#: Every image but library/large (110 MiB would be most of the run): 17.5 MiB, past MAX_SIZE.
IMAGES = ("library/small:1", "library/multi:1", "library/multiarch:1", "library/ociindex:1")
MAX_SIZE = os.environ.get("REGCACHE_SOAK_MAX_SIZE", "12Mi")
PULLERS = 3
SLOW_READERS = 2
HANG_UPS = 2
SLOWLORIS = 20
#: Generous bounds: a leak shows as growth far past these, not as a few percent.
PEAK_RSS = 600 * 1024 * 1024
PEAK_DESCRIPTORS = 1500
DESCRIPTORS_LEFT_OVER = 16


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def blob_files(storage: str) -> Set[str]:
    """The digests of the blob files in a store, from its layout (blobs/<alg>/<2 hex>/<hex>)."""
    root = os.path.join(storage, "blobs")
    return {f"{alg}:{name}" for alg in os.listdir(root) for sub in os.listdir(os.path.join(root, alg))
            for name in os.listdir(os.path.join(root, alg, sub))}


def probes_within(seconds: float) -> int:
    """
    How many probes regcache can send into a bare-429 storm of ``seconds``:
    one at the end of each pause, the pauses doubling from ABUSE_FIRST, so
    the k-th at 2 (2^k - 1) s after the first 429.
    """
    return int(math.log2(seconds / ABUSE_FIRST + 1))


def metric_sum(url: str, name: str, label: str = "") -> float:
    """The sum of a metric's samples whose labels contain ``label``; 0 if the process is not answering."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))


class Soak:
    """The clients, the fault schedule and the figures of one run."""

    def __init__(self, rc, hub, images, tmp_path):
        self.rc = rc
        self.hub = hub
        self.images = images
        self.tmp = tmp_path
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pulls = Counter()
        self.mismatched: List[str] = []
        #: The last line of each failed pull's stderr, for the printed figures.
        self.why: List[str] = []
        self.bytes_read = 0
        self.blob_reads = Counter()
        self.faults = Counter()
        self.cut_slowloris = 0
        self.peak_rss = 0
        self.peak_fds = 0
        self.blobs = {b.digest: b for name in IMAGES for b in images[name].blobs()}
        self.rng = random.Random(int(os.environ.get("REGCACHE_SOAK_SEED", "1414")))

    def expected(self, name: str):
        image = self.images[name]
        return image.child("amd64") if image.children else image

    # -- clients -------------------------------------------------------------

    def puller(self, n: int) -> None:
        i = n
        while not self.stop.is_set():
            name = IMAGES[i % len(IMAGES)]
            i += 1
            dest = str(self.tmp / f"pull{n}")
            r = skopeo_pull(f"{self.rc.host}/{name}", dest, timeout=120)
            with self.lock:
                if r.returncode != 0:
                    self.pulls["failed"] += 1
                    self.why.append(r.stderr.strip().splitlines()[-1][-200:] if r.stderr.strip() else "?")
            if r.returncode != 0:
                self.stop.wait(0.5)  # not a timing: keeps a refused client from spinning while regcache restarts
                continue
            with self.lock:
                self.pulls["completed"] += 1
                if dir_digests(dest) != expected_files(self.expected(name)):
                    self.mismatched.append(name)

    def raw_blob(self, digest: str, pace: float, hang_up_after: int = None) -> None:
        """GET one blob with a raw socket, read ``pace`` seconds apart, maybe hanging up early."""
        repo = next(name.split(":")[0] for name in IMAGES
                    if digest in {b.digest for b in self.images[name].blobs()})
        try:
            with socket.create_connection(("127.0.0.1", self.rc.port), timeout=30) as s:
                s.sendall(f"GET /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {self.rc.host}\r\n"
                          "Connection: close\r\n\r\n".encode())
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, body = data.split(b"\r\n\r\n", 1)
                if not head.startswith(b"HTTP/1.1 200"):
                    with self.lock:
                        self.blob_reads["refused"] += 1
                    return
                digest_of = hashlib.sha256(body)
                got = len(body)
                while got < self.blobs[digest].size:
                    if hang_up_after is not None and got >= hang_up_after:
                        with self.lock:
                            self.blob_reads["hung up"] += 1
                        return
                    time.sleep(pace)
                    chunk = s.recv(16 * 1024)
                    if not chunk:
                        break
                    digest_of.update(chunk)
                    got += len(chunk)
        except OSError:
            with self.lock:
                self.blob_reads["broken"] += 1
            self.stop.wait(0.5)
            return
        with self.lock:
            self.bytes_read += got
            if got == self.blobs[digest].size and "sha256:" + digest_of.hexdigest() == digest:
                self.blob_reads["complete"] += 1
            else:
                self.blob_reads["short"] += 1
                if got == self.blobs[digest].size:
                    self.mismatched.append(digest)

    def reader(self, hang_up: bool) -> None:
        digests = sorted(self.blobs)
        while not self.stop.is_set():
            digest = self.rng.choice(digests)
            if hang_up:
                self.raw_blob(digest, 0.0, hang_up_after=self.rng.randrange(1, 256 * 1024))
            else:
                self.raw_blob(digest, 0.05)

    def slowloris(self) -> None:
        """Header bytes one a second; the header deadline cuts it, and it comes back."""
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.rc.port), timeout=5) as s:
                    s.sendall(b"GET /v2/ HTTP/1.1\r\nX-Slow: ")
                    while not self.stop.wait(1.0):
                        s.sendall(b"a")
            except OSError:
                with self.lock:
                    self.cut_slowloris += 1
                self.stop.wait(0.5)

    def monitor(self) -> None:
        while not self.stop.wait(0.5):
            try:
                pid = self.rc.proc.pid
                self.peak_rss = max(self.peak_rss, rss(pid))
                self.peak_fds = max(self.peak_fds, descriptors(pid))
            except (OSError, AssertionError):
                continue  # between the kill and the restart

    # -- faults --------------------------------------------------------------

    def schedule(self) -> Dict[str, float]:
        """
        Inject the faults at fixed fractions of the run; returns the
        evictions counted before the kill, the blob files deleted in the
        moment between that count and the kill, and how long the storm lasted.
        """
        at = {"storm": 0.15, "calm": 0.25, "resets": 0.35, "kill": 0.55, "resets again": 0.75}
        start = time.monotonic()
        figures = {"evicted_before_kill": 0.0, "deleted_at_kill": 0, "storm_seconds": 0.0}
        storm_began = None
        for what, when in sorted(at.items(), key=lambda kv: kv[1]):
            if self.stop.wait(max(0.0, start + when * SECONDS - time.monotonic())):
                break
            if what == "storm":
                storm_began = time.monotonic()
                self.hub.mode("429-abuse")
                self.faults["429 storm"] += 1
            elif what == "calm":
                self.hub.mode("normal")
                figures["storm_seconds"] = time.monotonic() - storm_began
            elif what.startswith("resets"):
                self.hub.fault("reset", scope="blobs", times=3)
                self.faults["resets mid-blob"] += 3
            elif what == "kill":
                # An eviction that ends after the count, or is cut short by
                # the kill, shows as files gone in between.
                files = blob_files(self.rc.storage)
                figures["evicted_before_kill"] = metric_sum(self.rc.url, "regcache_evicted_total", 'kind="blob"')
                self.rc.kill()
                figures["deleted_at_kill"] = len((files - blob_files(self.rc.storage)) & set(self.blobs))
                self.faults["kill -9"] += 1
                self.rc.start()
        self.stop.wait(max(0.0, start + SECONDS - time.monotonic()))
        if storm_began is not None and not figures["storm_seconds"]:
            figures["storm_seconds"] = time.monotonic() - storm_began
        return figures


def test_soak(hub, regcache, images, tmp_path):
    """
    Under concurrent pulls, raw and hostile clients, a 429 storm, resets
    mid-blob, eviction pressure and a kill -9, nothing served is ever
    wrong, nothing stored is corrupt, resources come back, and upstream is
    asked for no blob more often than evictions and faults explain.
    """
    rc = regcache("--max-size", MAX_SIZE, "--tag-ttl", "2s", "--client-header-timeout", "5s",
                  "--client-progress-timeout", "20s")
    soak = Soak(rc, hub, images, tmp_path)
    rss_before, fds_before = rss(rc.proc.pid), descriptors(rc.proc.pid)

    workers = ([(soak.puller, (n,)) for n in range(PULLERS)] + [(soak.reader, (False,))] * SLOW_READERS
               + [(soak.reader, (True,))] * HANG_UPS + [(soak.slowloris, ())] * SLOWLORIS + [(soak.monitor, ())])
    with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        running = [pool.submit(f, *args) for f, args in workers]
        try:
            figures = soak.schedule()
        finally:
            soak.stop.set()
            hub.mode("normal")
            hub.clear_faults()
        for f in running:
            f.result()

    # Nothing lost: a clean pull of every image works after all that.
    for name in IMAGES:
        r = skopeo_pull(f"{rc.host}/{name}", str(tmp_path / "final"))
        assert r.returncode == 0, f"{name}: {r.stderr}"
        assert dir_digests(str(tmp_path / "final")) == expected_files(soak.expected(name)), name

    # Every descriptor the clients held is given back.
    def settled():
        n = descriptors(rc.proc.pid)
        return n if n <= fds_before + DESCRIPTORS_LEFT_OVER else None

    fds_after = wait_for(settled, 30, "descriptors to settle")
    rss_after = rss(rc.proc.pid)
    evicted = figures["evicted_before_kill"] + metric_sum(rc.url, "regcache_evicted_total", 'kind="blob"')
    log = rc.log()
    removed = sum(int(n) for n in re.findall(r"Removed (\d+) unfinished downloads", log))
    shown = {"log": log}
    for path in ("/metrics", "/status.json"):
        status, _, body = rc.get(path)
        assert status == 200, path
        shown[path] = body.decode()
    stats = hub.stats()
    rc.stop()
    verify = subprocess.run([sys.executable, "-m", "regcache", "verify", "--storage", rc.storage],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)

    gets: Dict[str, int] = stats["cdn_blob_gets"]
    fetched = stats["cdn_blob_gets_total"]
    refused = sum(stats["cdn_rate_limited"].values())
    refusable = len(gets) + probes_within(figures["storm_seconds"])
    explained = (len(gets) + evicted + figures["deleted_at_kill"] + soak.faults["resets mid-blob"] + refused
                 + removed)
    fills = Counter(re.findall(r"Blob fill (landed|failed|verified but not stored)", log))
    print(f"\nsoak: {SECONDS:.0f} s, pulls {dict(soak.pulls)}, blob reads {dict(soak.blob_reads)}, "
          f"{soak.bytes_read} bytes read raw, slowloris cut {soak.cut_slowloris}, faults {dict(soak.faults)}; "
          f"RSS before {rss_before}, peak {soak.peak_rss}, after {rss_after}; descriptors before {fds_before}, "
          f"peak {soak.peak_fds}, after {fds_after}; upstream blob GETs {fetched} for {len(gets)} distinct blobs, "
          f"{evicted:.0f} evictions (+{figures['deleted_at_kill']} at the kill), {refused} refused with 429 "
          f"in a {figures['storm_seconds']:.1f} s storm, {removed} unfinished removed at restart; "
          f"regcache's fills {dict(fills)}")
    print("failed pulls:", Counter(re.sub(r"[0-9a-f]{64}|\d+", "N", w) for w in soak.why).most_common(8))
    assert not soak.mismatched, f"wrong bytes served: {soak.mismatched}"
    assert soak.pulls["completed"] >= PULLERS, soak.pulls
    assert soak.blob_reads["complete"] >= 1, soak.blob_reads
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert set(gets) <= set(soak.blobs), "a blob no image holds was fetched"
    assert refused <= refusable, f"{refused} blob GETs refused with 429, only {refusable} could be"
    assert fetched <= explained, f"{fetched} upstream blob GETs, only {explained} explained"
    assert soak.peak_rss < PEAK_RSS and soak.peak_fds < PEAK_DESCRIPTORS
    password = USERS["ci"]
    for where, text in shown.items():
        for secret in (password, base64.b64encode(f"ci:{password}".encode()).decode()):
            assert secret not in text, f"the soak's {where} shows a credential"
