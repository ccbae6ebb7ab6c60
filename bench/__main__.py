"""
``python -m bench`` (or ``bench/run``): the whole side-by-side comparison of
regcache with distribution's proxy (the reference) and nginx, in one run.

Everything runs on this machine, on 127.0.0.1: a token-auth upstream behind
a switch, the two mirrors against it, nginx serving the same blob file.  Each
measurement is repeated and its median kept; mirrors take turns inside each
repetition, so a slow moment of the machine hits both and the ratios stay
honest.  Results go to ``bench/results/`` as JSON and markdown, and the
table is printed.
"""

import argparse
import json
import os
import shutil
import sys
import time
import traceback

from bench import images as image_builder
from bench import ceiling, crowd, measure, report, servers, shared

MIRRORS = ("regcache", "reference")
PULLED = ("small", "medium", "large", "multi")  # the crowd image is for the crowd phase only


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Run:
    def __init__(self, args):
        self.args = args
        self.reps = args.reps
        self.dir = os.path.join(args.workdir, "run")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.upstream = None
        self.warm = {}  # label -> the long-lived Mirror of the warm phases
        self.instances = []
        self.r = {"meta": {}, "direct": {}, "nginx": {}, "regcache": {}, "reference": {}}
        self.n = 0

    # Helpers

    def storage(self, label: str) -> str:
        self.n += 1
        return os.path.join(self.dir, f"{label}-{self.n}")

    def start(self, label: str, **options):
        cls = servers.Regcache if label == "regcache" else servers.Reference
        m = cls(label, self.dir, self.upstream.url).start(self.storage(label), **options)
        self.instances.append(m)
        return m

    def retire(self, m, keep_storage: bool = False) -> dict:
        usage = m.stop()
        self.r[m.label].setdefault("instances", []).append(usage)
        if not keep_storage and not self.args.keep:
            shutil.rmtree(m.storage, ignore_errors=True)
        return usage

    def add(self, where: dict, key: str, value) -> None:
        where.setdefault(key, []).append(value)

    def settle(self) -> None:
        """
        Flush dirty pages and pause, so writeback left by one phase (regcache
        fsyncs its fills, distribution does not) is not charged to the next.
        """
        os.sync()
        time.sleep(1)

    def attempt(self, what: str, f, *args, **kw):
        """Run one measurement; a failure is recorded, not fatal."""
        try:
            return f(*args, **kw)
        except Exception as e:
            log(f"  {what} failed: {e}")
            self.r["meta"].setdefault("failures", []).append(f"{what}: {e}")
            return None

    # Phases

    def setup(self) -> None:
        t = time.monotonic()
        self.images = image_builder.build(self.args.workdir, self.args.large_mib)
        self.large = self.images["large"]
        self.large_layer = self.large.layers[0]
        log(f"images ready in {time.monotonic() - t:.1f}s; starting the upstream")
        self.upstream = servers.Upstream(self.dir).start()
        for image in self.images.values():
            servers.push(self.upstream, image)
        self.r["meta"].update({
            "large_mib": self.args.large_mib, "reps": self.reps, "heavy_reps": self.args.heavy_reps, "duration_s": self.args.duration,
            "connections": self.args.connections, "clients": self.args.clients, "crowd": self.args.crowd,
            "idle_clients": self.args.idle_clients, "cores": os.cpu_count(),
            "images": {k: {"digest": v.digest, "bytes": v.size} for k, v in self.images.items()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        })
        log(f"upstream ready with {len(self.images)} images in {time.monotonic() - t:.1f}s")

    def pulls(self) -> None:
        """Cold then warm pull of every image, and a direct pull from the upstream for scale."""
        for rep in range(self.reps):
            self.settle()
            log(f"pulls, repetition {rep + 1}/{self.reps}")
            d = self.r["direct"].setdefault("pull", {})
            for name in PULLED:
                image = self.images[name]
                self.add(d, name, self.attempt(f"direct pull {name}", measure.pull, self.upstream.host, image))
            for label in MIRRORS:
                m = self.start(label)
                cold = self.r[label].setdefault("cold", {})
                warm = self.r[label].setdefault("warm", {})
                since = self.upstream.log_offset()
                for name in PULLED:
                    image = self.images[name]
                    before = m.process.usage()
                    self.add(cold, name, self.attempt(f"{label} cold {name}", measure.pull, m.host, image))
                    if name == "large":
                        self.add(self.r[label], "cpu_cold_large", m.process.usage()["cpu_s"] - before["cpu_s"])
                        time.sleep(0.5)  # let the upstream's log catch up
                        self.add(self.r[label], "single_serves",
                                 self.upstream.blob_serves(self.large_layer["digest"], since)["gets"])
                    self.add(warm, name, self.attempt(f"{label} warm {name}", measure.pull, m.host, image))
                if rep == self.reps - 1:
                    self.warm[label] = m  # kept running for the warm phases
                else:
                    self.retire(m)

    def concurrent(self) -> None:
        """8 cold pulls of the large image at once, on a fresh mirror each time."""
        reps = self.args.heavy_reps
        for rep in range(reps):
            log(f"8 concurrent cold pulls, repetition {rep + 1}/{reps}")
            for label in MIRRORS:
                self.settle()
                m = self.start(label)
                since = self.upstream.log_offset()
                upstream_cpu = self.upstream.cpu_s()
                c = self.r[label].setdefault("concurrent", {})
                self.add(c, "wall", self.attempt(f"{label} 8 concurrent", measure.concurrent_pulls,
                                                 m.host, self.large, self.args.clients))
                serves = self._settled_serves(since)
                self.add(c, "upstream_cpu_s", self.upstream.cpu_s() - upstream_cpu)
                self.add(c, "gets", serves["gets"])
                self.add(c, "amplification_bytes", serves["bytes"] / self.large_layer["size"])
                # The same 8 pulls again, now warm: what the clients alone
                # cost on this machine, the floor for any mirror.
                self.settle()
                self.add(c, "warm_wall", self.attempt(f"{label} 8 concurrent warm", measure.concurrent_pulls,
                                                      m.host, self.large, self.args.clients))
                usage = self.retire(m)
                self.add(c, "rss_mib", usage.get("rss_mib"))
                self.add(c, "cpu_s", usage.get("cpu_s"))

    def _settled_serves(self, since: int) -> dict:
        """Upstream serves of the large blob, once the count stops moving (fills may lag clients)."""
        last, deadline = None, time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = self.upstream.blob_serves(self.large_layer["digest"], since)
            if now == last:
                break
            last = now
        return now

    def throughput(self) -> None:
        """Warm blob throughput, 1 and 8 curl streams, for both mirrors and nginx."""
        blob = self.large_layer
        path = f"/v2/{self.large.name}/blobs/{blob['digest']}"
        nginx = servers.Nginx(self.dir, servers._blob_file(self.upstream.storage, blob["digest"])).start()
        targets = {"nginx": nginx.url}
        targets.update({label: self.warm[label].url + path for label in MIRRORS})
        try:
            self.settle()
            for rep in range(self.reps):
                log(f"warm blob throughput, repetition {rep + 1}/{self.reps}")
                for label, url in targets.items():
                    before = self._usage(label)
                    for n in (1, self.args.clients):
                        got = self.attempt(f"{label} {n} streams", measure.streams, url, n, blob["size"])
                        self.add(self.r[label], f"stream{n}", got)
                    self._add_cpu(label, "cpu_streams", before)
        finally:
            nginx.stop()

    def crowd(self) -> None:
        """
        ``--crowd`` clients at once, each fetching the warm 64 MiB blob once,
        from nginx and from a fresh regcache (so its peak RSS is this
        phase's), then ``--idle-clients`` keep-alive connections held idle
        until regcache's idle timeout closes them, its memory watched.  All
        clients are on 127.0.0.1: regcache runs with
        ``--max-connections-per-client unlimited``, and ``--max-connections``
        just above the idle crowd.
        """
        image = self.images["crowd"]
        blob = image.layers[0]
        from regcache.site import IDLE_CLIENT_TIMEOUT as idle_timeout

        n, idle_n = self.args.crowd, self.args.idle_clients
        # auto caps connections at a third of the open-file limit (6,645 of 20,000 here), which leaves
        # descriptors for the blobs each response holds: set above the idle crowd instead.
        m = self.start("regcache", extra=("--max-connections-per-client", "unlimited",
                                          "--max-connections", str(idle_n + 100)))
        out = self.r["regcache"].setdefault("crowd", {})
        nginx = servers.Nginx(self.dir, servers._blob_file(self.upstream.storage, blob["digest"])).start()
        try:
            url = f"{m.url}/v2/{image.name}/blobs/{blob['digest']}"
            measure.streams(url, 1, blob["size"])  # cached now
            out["rss_before_mib"] = _rss_now(m.process.pid)
            self.settle()
            for rep in range(self.args.crowd_reps):
                for label, u in (("nginx", nginx.url), ("regcache", url)):
                    log(f"{n} clients at once on {label}, repetition {rep + 1}/{self.args.crowd_reps}")
                    got = self.attempt(f"{label} {n} clients", crowd.fetch, u, n, blob["size"], timeout=300)
                    self.add(self.r[label].setdefault("crowd", {}), "fetch", got)
            out["peak_rss_mib"] = m.process.usage()["rss_mib"]
            log(f"{idle_n} idle keep-alive connections on regcache, idle timeout {idle_timeout} s")
            out["rss_before_idle_mib"] = _rss_now(m.process.pid)

            def watch():
                # While the connections are held: RSS every 0.2 s until the idle timeout has passed.
                top, end = 0.0, time.monotonic() + idle_timeout + 5
                while time.monotonic() < end:
                    top = max(top, _rss_now(m.process.pid))
                    time.sleep(0.2)
                return top

            got = self.attempt("regcache idle connections", crowd.idle, f"{m.url}/v2/", idle_n,
                               hold=idle_timeout + 15, during=watch)
            if got:
                got["rss_held_max_mib"] = got.pop("during")
                got["rss_after_mib"] = _rss_now(m.process.pid)
            out["idle"] = got
        finally:
            nginx.stop()
            self.retire(m)

    def manifests(self) -> None:
        """
        Requests/s, p50 and p99 of cached manifest GET (wrk) and HEAD (ab),
        by digest and by tag, at ``--connections`` and 256 connections:
        regcache, the reference, and nginx serving the same manifest bytes
        as a static file under the same paths with the headers regcache
        answers with (the limit for this machine); and the same bytes and
        headers from a bare twisted.web Resource and a bare Klein route
        (bench.ceiling: the floor of regcache's HTTP stack).
        """
        secs = self.args.duration
        reps = self.args.heavy_reps
        image = self.images["small"]
        paths = {by: f"/v2/{image.name}/manifests/{ref}" for by, ref in (("digest", image.digest), ("tag", image.tag))}
        nginx = self._manifest_nginx(paths["digest"], paths.values())
        floors = {kind: ceiling.Ceiling(kind, self.dir, nginx.static[0][1], nginx.static[0][2]).start()
                  for kind in ceiling.KINDS}
        bases = {label: self.warm[label].url for label in MIRRORS}
        bases["nginx"] = nginx.url.rsplit("/", 1)[0]
        bases.update({kind: f.url for kind, f in floors.items()})
        self.settle()
        try:
            for rep in range(reps):
                log(f"manifest load, repetition {rep + 1}/{reps}")
                for label, base in bases.items():
                    self.r.setdefault(label, {})
                    before = self._usage(label)
                    for by, path in paths.items():
                        url = base + path
                        # One request first: the tag's check (and the cache's
                        # entry for this Accept list) happens outside the load.
                        self.attempt(f"{label} warm-up {by}", measure.get, url)
                        load = self.r[label].setdefault("manifest", {})
                        for conns in sorted({self.args.connections, 256}):
                            suffix = "" if conns == self.args.connections else f"_c{conns}"
                            self.add(load, f"get_{by}{suffix}", self.attempt(
                                f"{label} GET by {by}, {conns} connections", measure.wrk, url, secs, conns))
                            self.add(load, f"head_{by}{suffix}", self.attempt(
                                f"{label} HEAD by {by}, {conns} connections", measure.ab_head, url, secs, conns))
                    self._add_cpu(label, "cpu_manifests", before)
        finally:
            nginx.stop()
            for f in floors.values():
                f.stop()

    def _manifest_nginx(self, digest_path: str, paths) -> "servers.Nginx":
        """
        nginx serving the bytes regcache answers a manifest GET with, under
        ``paths``, with the same headers but those nginx makes itself.
        """
        import urllib.request

        req = urllib.request.Request(self.warm["regcache"].url + digest_path, headers={"Accept": measure.ACCEPT})
        with urllib.request.urlopen(req, timeout=30) as r:
            body, headers = r.read(), dict(r.headers)
        kept = {k: v for k, v in headers.items()
                if k.lower() not in ("date", "server", "content-length", "connection", "keep-alive")}
        file = os.path.join(self.dir, "manifest.json")
        with open(file, "wb") as f:
            f.write(body)
        self.r["meta"]["manifest_headers"] = kept
        blob = self.large_layer
        return servers.Nginx(self.dir, servers._blob_file(self.upstream.storage, blob["digest"]),
                             static=[(p, file, kept) for p in paths]).start()

    def mixed(self) -> None:
        """
        Cached manifest GETs while 8 streams of the large blob run: does a
        busy blob path starve the small requests?  (Not a target of the
        issue; it is what a mirror under real load looks like.)
        """
        import threading

        blob = self.large_layer
        small = self.images["small"]
        reps = self.args.heavy_reps
        for rep in range(reps):
            log(f"manifest load during blob streams, repetition {rep + 1}/{reps}")
            for label in MIRRORS:
                m = self.warm[label]
                blob_url = f"{m.url}/v2/{self.large.name}/blobs/{blob['digest']}"
                stop = threading.Event()

                def streams():
                    deadline = time.monotonic() + self.args.duration + 30
                    while not stop.is_set() and time.monotonic() < deadline:
                        self.attempt(f"{label} streams under load", measure.streams, blob_url,
                                     self.args.clients, blob["size"])

                t = threading.Thread(target=streams)
                t.start()
                time.sleep(0.5)
                url = f"{m.url}/v2/{small.name}/manifests/{small.digest}"
                got = self.attempt(f"{label} GET during streams", measure.wrk, url, self.args.duration, 4)
                stop.set()
                t.join()
                self.add(self.r[label].setdefault("manifest", {}), "get_digest_busy", got)

    def outage(self) -> None:
        """
        A cached tag pull while the upstream is stopped (refused) and
        black-holed, inside and outside regcache's revalidation window,
        and, black-holed, once regcache's circuit for it is open; an
        uncached manifest pull black-holed, the first time and while the
        circuit is open.  regcache restarts on its warm storage with a short
        window (``--tag-ttl``), so "outside" comes within seconds.  The
        reference has no window and no circuit: its figures are the same
        requests at the same moments.
        """
        ttl = self.args.outage_ttl
        old = self.warm["regcache"]
        self.retire(old, keep_storage=True)
        m = servers.Regcache("regcache", self.dir, self.upstream.url)
        m.start(old.storage, tag_ttl=f"{ttl}s")
        self.instances.append(m)
        self.warm["regcache"] = m
        small = self.images["small"]
        timeout = regcache_default("header-timeout")
        for label in MIRRORS:
            m = self.warm[label]
            regcache = label == "regcache"
            out = self.r[label].setdefault("outage", {})
            for mode in ("refuse", "blackhole"):
                log(f"{label}: cached tag pull with the upstream {mode}")
                self.upstream.switch("forward")
                if regcache:
                    self._until_circuit(m, 0, lambda: self._revalidate(m, small))
                    time.sleep(ttl + 0.5)  # so the next pull revalidates: the window starts now
                self.attempt(f"{label} pull before {mode}", measure.pull, m.host, small)
                checked = time.monotonic()
                self.upstream.switch(mode)
                out[f"{mode}_inside"] = self._timed_pull(m, small)
                if regcache:
                    time.sleep(max(checked + ttl + 0.5 - time.monotonic(), 0))
                    out[f"{mode}_outside"] = self._timed_pull(m, small)
                else:
                    out[f"{mode}_outside"] = out[f"{mode}_inside"]  # no window: every tag pull goes upstream
            # Black-holed still: the check the last pull left running ends at
            # the header timeout and opens the circuit.
            if regcache:
                self._until_circuit(m, 2, lambda: None, attempts=int(timeout * 10) + 50)
            out["blackhole_open"] = self._timed_pull(m, small)
            out["uncached_blackhole_open"] = self._timed_get(m, small, "uncached-open")
            log(f"{label}: uncached pull with the upstream black-holed, circuit closed")
            self.upstream.switch("forward")
            if regcache:
                self._until_circuit(m, 0, lambda: self._revalidate(m, small))
            self.upstream.switch("blackhole")
            out["uncached_blackhole_first"] = self._timed_get(m, small, "uncached-first")
            self.upstream.switch("forward")
        self.r["meta"]["outage_tag_ttl_s"] = ttl
        self.r["meta"]["regcache_header_timeout_s"] = timeout

    def shared(self) -> None:
        """The shared level: 3 regcache replicas on one SeaweedFS bucket (bench/shared.py)."""
        shared.phase(self)

    def _revalidate(self, m, image) -> None:
        """A manifest request of the tag (answered whatever the upstream does), to let a probe through."""
        measure._http(f"{m.url}/v2/{image.name}/manifests/{image.tag}", headers={"Accept": measure.ACCEPT})

    def _until_circuit(self, m, state: int, nudge, attempts: int = 100) -> None:
        """
        Wait, in a bounded number of 0.1 s steps, for regcache's
        regcache_upstream_circuit_state to be ``state``, calling ``nudge``
        between looks (a closed circuit needs a request to close it).
        """
        for _ in range(attempts):
            _, body = measure._http(m.url + "/metrics")
            values = [line.rsplit(" ", 1)[1] for line in body.decode().splitlines()
                      if line.startswith("regcache_upstream_circuit_state{")]
            if values and float(values[0]) == state:
                return
            nudge()
            time.sleep(0.1)
        self.r["meta"].setdefault("failures", []).append(f"regcache circuit never reached state {state}")

    def _timed_get(self, m, image, tag: str) -> dict:
        """An uncached manifest pull: one GET of a tag the mirror has never seen, timed, with its answer."""
        t = time.monotonic()
        code, body = measure._http(f"{m.url}/v2/{image.name}/manifests/{tag}", headers={"Accept": measure.ACCEPT},
                                   timeout=60)
        return {"seconds": time.monotonic() - t, "ok": code == 200, "status": code,
                "error": body.decode("utf-8", "replace")[:200]}

    def startup(self) -> None:
        """
        regcache restarted on a store of ``--startup-blobs`` small blobs
        written straight to disk (the test suite's synthetic layout): seconds
        until /readyz answers, and the start-up index's own time, from its
        log line.  The reference keeps no index: it has no figure.
        """
        from tests.integration.synthetic import write_store

        n = self.args.startup_blobs
        storage = self.storage("regcache-startup")
        os.makedirs(storage)
        write_store(storage, (n + 2) // 3)
        out = self.r["regcache"].setdefault("startup", {})
        self.r["meta"]["startup_blobs"] = n
        try:
            for rep in range(self.reps):
                self.settle()
                log(f"start-up on {n} blobs, repetition {rep + 1}/{self.reps}")
                got = self.attempt("regcache start-up", self._timed_start, storage, rep + 1)
                for key, value in (got or {}).items():
                    self.add(out, key, value)
        finally:
            if not self.args.keep:
                shutil.rmtree(storage, ignore_errors=True)

    def cold(self) -> None:
        """
        Time to first byte of a cold blob: each of the cold image's 20
        layers fetched once with curl from a fresh regcache (nothing
        cached: its first request also fetches regcache's token) and once
        straight from the upstream with a token in hand, taking turns blob
        by blob.  The median of each, and their difference, is the figure;
        the whole downloads' times are kept too.
        """
        image = self.images["cold"]
        reps = self.args.heavy_reps
        token = measure.bearer(self.upstream.url, image.name)
        for rep in range(reps):
            self.settle()
            log(f"cold time to first byte, 20 blobs, repetition {rep + 1}/{reps}")
            m = self.start("regcache")
            try:
                for layer in image.layers:
                    path = f"/v2/{image.name}/blobs/{layer['digest']}"
                    self.add(self.r["direct"].setdefault("cold_blob", {}), "samples",
                             self.attempt("direct cold blob", measure.first_byte, self.upstream.url + path, token))
                    self.add(self.r["regcache"].setdefault("cold_blob", {}), "samples",
                             self.attempt("regcache cold blob", measure.first_byte, m.url + path))
            finally:
                self.retire(m)

    def bigstore(self) -> None:
        """
        regcache on a synthetic store of ``--bigstore-blobs`` blobs
        (bench/bigstore.py: made once under --workdir, reused, and repaired
        after the eviction it suffers here).  First a plain start: seconds
        until /readyz answers 200, until the start-up index is complete (its
        log line, also regcache_store_indexed), RSS then, CPU seconds spent,
        and the worst /healthz answer while indexing (the reactor's longest
        stall).  Then a start with --max-size just below the store's size:
        the eviction pass that follows the index, from its log line (how
        many entries and bytes, time to choose them on the reactor, time to
        delete them in a thread) and the worst /healthz meanwhile.
        """
        from bench import bigstore

        n = self.args.bigstore_blobs
        root = os.path.join(self.args.workdir, f"bigstore-{n}")
        out = self.r["regcache"].setdefault("bigstore", {})
        log(f"big store of {n} blobs at {root}: making or repairing it")
        out["made"] = bigstore.make(root, n)
        size = bigstore.store_bytes(n)
        self.r["meta"]["bigstore_blobs"] = n
        out["store_bytes"] = size
        self.settle()
        log("big store: start-up")
        out["start"] = self.attempt("big store start-up", self._big_start, root, ())
        limit = int(size * 0.99)
        log(f"big store: start-up with --max-size {limit} (the store holds {size} bytes)")
        out["evict"] = self.attempt("big store eviction", self._big_start, root, ("--max-size", str(limit)))
        out["limit"] = limit

    def _big_start(self, root: str, extra) -> dict:
        """One start on the big store, watched until its index (and with ``extra``, the eviction) is done."""
        m = servers.Regcache("regcache", self.dir, self.upstream.url)
        log_path = root + ".log"
        if os.path.exists(log_path):
            os.unlink(log_path)
        t = time.monotonic()
        try:
            m.start(root, extra=extra)
            got = {"ready_s": time.monotonic() - t}
            want = measure.EVICTED if extra else measure.INDEXED
            worst, deadline = 0.0, t + 900
            while True:
                with open(log_path, errors="replace") as f:
                    text = f.read()
                if time.monotonic() > deadline:
                    break
                if want.search(text) and (not extra or _pass_done(text)):
                    break
                a = time.monotonic()
                measure._http(m.url + "/healthz", timeout=60)
                worst = max(worst, time.monotonic() - a)
                time.sleep(0.1)
            got["done_s"] = time.monotonic() - t
            got["worst_healthz_s"] = worst
            found = measure.INDEXED.search(text)
            got["index_s"] = float(found.group(1)) if found else None
            batches = [m.groupdict() for m in measure.EVICTED.finditer(text)]
            if batches:
                got["batches"] = len(batches)
                for k in ("entries", "manifests", "freed"):
                    got[k] = sum(float(b[k]) for b in batches)
                got["delete_s"] = max(float(b["delete_s"]) for b in batches)
                chosen = [float(b["chose_s"]) for b in batches if b["chose_s"] is not None]
                if chosen:
                    got["chose_s"], got["chose_max_s"] = sum(chosen), max(chosen)
            usage = m.process.usage()
            got["rss_mib"], got["cpu_s"] = _rss_now(m.process.pid), usage["cpu_s"]
            got["peak_rss_mib"] = usage["rss_mib"]
            return got
        finally:
            if m.process is not None:
                m.stop()

    def _timed_start(self, storage: str, run: int) -> dict:
        m = servers.Regcache("regcache", self.dir, self.upstream.url)
        t = time.monotonic()
        try:
            m.start(storage)
            ready = time.monotonic() - t
            return {"ready_s": ready, "index_s": measure.index_seconds(storage + ".log", run)}
        finally:
            # Not retired: an instance that served nothing has no place
            # in the mirrors' peak RSS.
            if m.process is not None:
                m.stop()

    def _timed_pull(self, m, image) -> dict:
        t = time.monotonic()
        try:
            measure.pull(m.host, image, timeout=60, name="outage")
            return {"seconds": time.monotonic() - t, "ok": True}
        except measure.PullFailed as e:
            return {"seconds": time.monotonic() - t, "ok": False, "error": str(e)[:200]}

    def _usage(self, label: str) -> dict:
        if label not in MIRRORS:
            return {}
        return self.warm[label].process.usage()

    def _add_cpu(self, label: str, key: str, before: dict) -> None:
        if label in MIRRORS:
            self.add(self.r[label], key, self._usage(label)["cpu_s"] - before["cpu_s"])

    def finish(self) -> None:
        for label in MIRRORS:
            if label in self.warm:
                self.r[label]["warm_instance"] = self.warm[label].process.usage()
                self.retire(self.warm[label])
        self.r["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")

    def cleanup(self) -> None:
        for m in self.instances:
            if m.process is not None:
                m.process.stop()
        if self.upstream is not None:
            self.upstream.stop()
        shutil.rmtree(measure.SCRATCH, ignore_errors=True)
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def _pass_done(log_text: str) -> bool:
    """
    Whether an eviction pass's batches (one log line each, as each is
    deleted) add up to all it freed: the first batch's store before, less
    what the store holds now.
    """
    batches = [m.groupdict() for m in measure.EVICTED.finditer(log_text)]
    freed = sum(int(b["freed"]) for b in batches)
    return freed >= int(batches[0]["before"]) - int(batches[-1]["after"])


def _rss_now(pid: int) -> float:
    """Resident memory now (VmRSS, MiB): what a held connection costs, unlike the peak."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def regcache_default(name: str) -> float:
    """A duration setting's default in the regcache under test (the target depends on it)."""
    from regcache import config

    setting = next(s for s in config.SETTINGS if s.name == name)
    return config.parse_duration(name, setting.default)


TOOLS = {"skopeo": "skopeo", "docker-registry": "docker-registry", "nginx": "nginx-light", "wrk": "wrk",
         "ab": "apache2-utils", "curl": "curl"}


def preflight(phases) -> None:
    """Stop at once, naming the packages, when a tool the bench runs is missing."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        sys.exit(f"bench: missing tools; install them with: apt-get install -y {' '.join(missing)}")
    if "shared" in phases:
        from tests.integration.seaweed import weed_binary

        try:
            weed_binary()
        except RuntimeError as e:
            sys.exit(f"bench: the shared phase needs SeaweedFS: {e}")
    if not os.path.isdir("/dev/shm"):
        sys.exit("bench: needs /dev/shm (a tmpfs) for the clients' copies")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="repetitions of pulls and streams (median kept)")
    p.add_argument("--heavy-reps", type=int, default=3,
                   help="repetitions of the 8-concurrent pulls and the manifest loads")
    p.add_argument("--large-mib", type=int, default=512, help="size of the large image's layer")
    p.add_argument("--duration", type=int, default=3, help="seconds of each manifest load")
    p.add_argument("--connections", type=int, default=32, help="connections of each manifest load")
    p.add_argument("--clients", type=int, default=8, help="concurrent pulls and streams")
    p.add_argument("--outage-ttl", type=float, default=5, help="regcache --tag-ttl in the outage phase")
    p.add_argument("--startup-blobs", type=int, default=10000, help="blobs in the store of the startup phase")
    p.add_argument("--bigstore-blobs", type=int, default=1000000,
                   help="blobs in the synthetic store of the bigstore phase (made once under --workdir, reused)")
    p.add_argument("--crowd", type=int, default=1000, help="clients at once of the crowd phase (64 MiB each)")
    p.add_argument("--crowd-reps", type=int, default=1, help="repetitions of the crowd (about a minute each)")
    p.add_argument("--idle-clients", type=int, default=10000, help="idle keep-alive connections of the crowd phase")
    p.add_argument("--workdir", default="/var/tmp/regcache-bench", help="images and run files (on disk)")
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--keep", action="store_true", help="keep the run directory (logs, storages)")
    p.add_argument("--phases",
                   default="pulls,concurrent,cold,throughput,crowd,manifests,mixed,outage,startup,bigstore,shared")
    args = p.parse_args(argv)
    phases = args.phases.split(",")
    preflight(phases)
    run = Run(args)
    started = time.monotonic()
    try:
        run.setup()
        for phase in ("pulls", "concurrent", "cold", "throughput", "crowd", "manifests", "mixed", "outage",
                      "startup", "bigstore", "shared"):
            if phase in phases:
                if phase in ("throughput", "manifests", "mixed", "outage") and not run.warm:
                    run.warm = {label: run.start(label) for label in MIRRORS}
                    for label, m in run.warm.items():
                        for image in run.images.values():
                            measure.pull(m.host, image, full_hash=False)
                t = time.monotonic()
                getattr(run, phase)()
                run.r["meta"].setdefault("phase_s", {})[phase] = round(time.monotonic() - t, 1)
        run.finish()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        run.cleanup()
    run.r["meta"]["wall_s"] = time.monotonic() - started
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "latest.json"), "w") as f:
        json.dump(run.r, f, indent=1)
    table = report.markdown(run.r)
    with open(os.path.join(args.results, "latest.md"), "w") as f:
        f.write(table)
    print(table)
    log(f"done in {run.r['meta']['wall_s']:.0f}s; results in {args.results}/latest.json and latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
