"""
The shared level's figures (issue 16), the ``shared`` phase of ``bench/run``:
three regcache processes sharing one SeaweedFS bucket (``weed mini`` on
loopback, as the tests start it), in front of the bench's upstream.

- **Upstream fetches per blob**: 8 skopeo cold pulls of the large image at
  once, spread over the 3 replicas (client i on replica i mod 3); the
  upstream's own log counts its serves of each layer.  The reference is
  distribution's proxy run the same way: 3 replicas on one filesystem root.
- **A bucket hit against a local hit**: a fourth, fresh replica GETs each
  blob (the large layer, and the small image's 1 MiB layer) from the bucket
  (the bucket-backed cold fill, streamed to the client and the local
  level at once), then the same GET again, now a local hit.  With
  ``--s3-redirect``, a fifth fresh replica's GET of the large layer follows
  the 307 to SeaweedFS.
- **RSS**: the peak (VmHWM) of every regcache of the phase, and of SeaweedFS.

Each repetition has the bucket to itself under a prefix of its own, so the
phase re-runs on any state: ``bench/run --phases shared``.
"""

import os
import shutil
import time
import urllib.request
from typing import Dict, List

from bench import measure, servers

REPLICAS = 3


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def spread_pulls(hosts: List[str], image, n: int, timeout: float = 600) -> float:
    """Wall seconds for ``n`` skopeo pulls started at once, client i on ``hosts[i % len(hosts)]``, all verified."""
    dests = [measure._scratch(f"shared-pull-{i}") for i in range(n)]
    t = time.monotonic()
    pulls = [measure.start_pull(hosts[i % len(hosts)], image, d) for i, d in enumerate(dests)]
    errors = []
    try:
        for p, d in zip(pulls, dests):
            try:
                measure.finish_pull(p, image, d, max(timeout - (time.monotonic() - t), 1), full_hash=False)
            except measure.PullFailed as e:
                errors.append(str(e))
        took = time.monotonic() - t
        if errors:
            raise measure.PullFailed(f"{len(errors)} of {n} pulls failed: {errors[0]}")
        measure.verify(image, dests[0], full_hash=True)
        return took
    finally:
        for d in dests:
            shutil.rmtree(d, ignore_errors=True)


def _counter(url: str, name: str, **labels) -> float:
    """The sum of a counter's samples with ``labels`` on a regcache's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Shared:
    """The phase, on a bench Run (its upstream, images, run directory and helpers)."""

    def __init__(self, run):
        from tests.integration.seaweed import SECRET_KEY, Seaweed

        self.run = run
        self.out = run.r.setdefault("shared", {})
        self.seaweed = Seaweed(os.path.join(run.dir, "seaweed"))
        self.secret = os.path.join(run.dir, "s3-secret")
        with open(self.secret, "w") as f:
            f.write(SECRET_KEY)
        self.rss: Dict[str, List[float]] = {"regcache": [], "seaweed": []}

    def regcache(self, prefix: str, *extra: str):
        m = servers.Regcache("shared", self.run.dir, self.run.upstream.url)
        m.start(self.run.storage("shared"), extra=(*self.seaweed.regcache_args(prefix),
                                                   "--s3-secret-key-file", self.secret, *extra))
        self.run.instances.append(m)
        return m

    def stop(self, m) -> None:
        usage = m.stop()
        if usage.get("rss_mib") is not None:
            self.rss["regcache"].append(usage["rss_mib"])
        shutil.rmtree(m.storage, ignore_errors=True)

    def __call__(self) -> None:
        self.seaweed.start()
        try:
            for rep in range(self.run.args.heavy_reps):
                _log(f"shared level, repetition {rep + 1}/{self.run.args.heavy_reps}")
                self.run.settle()
                self.regcache_rep(f"bench-{int(time.time())}-{rep}/")
                self.run.settle()
                self.run.attempt("reference fan-out", self.reference_rep)
                self.rss["seaweed"].append(peak_rss_mib(self.seaweed.proc.pid))
        finally:
            self.seaweed.kill()
        self.out["peak_rss_mib"] = {k: max(v) if v else None for k, v in self.rss.items()}

    def _serves(self, image, since: int) -> List[int]:
        """Upstream serves of each layer of ``image`` since ``since``, once the counts stop moving."""
        last, deadline = None, time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = [self.run.upstream.blob_serves(layer["digest"], since)["gets"] for layer in image.layers]
            if now == last:
                break
            last = now
        return now

    def regcache_rep(self, prefix: str) -> None:
        run, large, small = self.run, self.run.large, self.run.images["small"]
        replicas = [self.regcache(prefix) for _ in range(REPLICAS)]
        fresh = []
        try:
            since = run.upstream.log_offset()
            wall = run.attempt("shared fan-out", spread_pulls, [m.host for m in replicas], large, run.args.clients)
            gets = self._serves(large, since)
            run.add(self.out, "fanout_wall_s", wall)
            run.add(self.out, "fetches_per_blob", sum(gets) / len(gets))
            run.attempt("shared small pull", measure.pull, replicas[0].host, small)
            # Two blobs each (config and layer) reach the bucket once in all.
            # Only blob uploads count: the manifests, tags and links go up
            # too, and long before the large layer does, so counting them
            # let the bucket-hit GET start before the layer was there (it was
            # then a miss, forwarded to the replica still uploading it).
            blobs = 2 * 2
            deadline = time.monotonic() + 120
            while sum(_counter(m.url, "regcache_shared_uploads_total", kind="blob", result="uploaded")
                      for m in replicas) < blobs:
                if time.monotonic() > deadline:
                    run.r["meta"].setdefault("failures", []).append("shared: the blobs never all reached the bucket")
                    break
                time.sleep(0.2)
            for result in ("uploaded", "present", "failed"):
                run.add(self.out, f"uploads_{result}",
                        sum(_counter(m.url, "regcache_shared_uploads_total", kind="blob", result=result)
                            for m in replicas))
            fresh.append(self.regcache(prefix))
            for name, image in (("large", large), ("small", small)):
                layer = image.layers[0]
                url = f"{fresh[0].url}/v2/{image.name}/blobs/{layer['digest']}"
                for kind in ("bucket_hit", "local_hit"):
                    # Where the bytes came from, not how often the bucket was
                    # asked: a fill that finds the blob on a second look (a
                    # lease let go meanwhile) reads the bucket too.
                    before = _counter(fresh[0].url, "regcache_shared_blob_bytes_total", source="bucket")
                    got = run.attempt(f"shared {kind} {name}", measure.streams, url, 1, layer["size"])
                    came = _counter(fresh[0].url, "regcache_shared_blob_bytes_total", source="bucket") - before
                    if got and came != (layer["size"] if kind == "bucket_hit" else 0):
                        run.r["meta"].setdefault("failures", []).append(
                            f"shared: the {kind} GET of the {name} layer was not one "
                            f"({came:.0f} of its {layer['size']} bytes from the bucket)")
                        got = None
                    if got:
                        run.add(self.out, f"{kind}_{name}_s", got["wall_s"])
                        run.add(self.out, f"{kind}_{name}_bps", got["aggregate"])
            fresh.append(self.regcache(prefix, "--s3-redirect"))
            layer = large.layers[0]
            url = f"{fresh[1].url}/v2/{large.name}/blobs/{layer['digest']}"
            got = run.attempt("shared redirect large", measure.streams, url, 1, layer["size"], follow=True)
            if got:
                run.add(self.out, "redirect_large_s", got["wall_s"])
                run.add(self.out, "redirect_large_bps", got["aggregate"])
        finally:
            for m in replicas + fresh:
                self.stop(m)

    def reference_rep(self) -> None:
        """distribution's proxy, 3 replicas on one filesystem root, the same 8 pulls spread over them."""
        run, large = self.run, self.run.large
        root = run.storage("reference-shared")
        replicas = [servers.Reference("reference", run.dir, run.upstream.url).start(root) for _ in range(REPLICAS)]
        run.instances.extend(replicas)
        try:
            since = run.upstream.log_offset()
            wall = spread_pulls([m.host for m in replicas], large, run.args.clients)
            gets = self._serves(large, since)
            run.add(self.out, "reference_fanout_wall_s", wall)
            run.add(self.out, "reference_fetches_per_blob", sum(gets) / len(gets))
        finally:
            for m in replicas:
                m.stop()
            shutil.rmtree(root, ignore_errors=True)


def phase(run) -> None:
    Shared(run)()


def markdown(res: dict) -> List[str]:
    """The phase's rows, for bench/results/latest.md."""
    from bench.report import _fmt, _gb, _m

    s = res.get("shared")
    if not s:
        return []
    rss = s.get("peak_rss_mib", {})
    rows = [
        ("upstream fetches per blob, 8 clients over 3 replicas (goal 1.00)",
         _fmt(_m(s.get("fetches_per_blob"))), _fmt(_m(s.get("reference_fetches_per_blob")))),
        ("8 cold pulls over 3 replicas, wall (s)", _fmt(_m(s.get("fanout_wall_s"))),
         _fmt(_m(s.get("reference_fanout_wall_s")))),
    ]
    for name in ("large", "small"):
        for kind, what in (("bucket_hit", "bucket hit (a cold fill from the bucket)"), ("local_hit", "local hit")):
            rows.append((f"GET of the {name} layer, {what}: s, GB/s", f"{_fmt(_m(s.get(f'{kind}_{name}_s')), 3)}, "
                         f"{_gb(_m(s.get(f'{kind}_{name}_bps')))}", ""))
    rows.append(("GET of the large layer with --s3-redirect (307, then SeaweedFS): s, GB/s",
                 f"{_fmt(_m(s.get('redirect_large_s')), 3)}, {_gb(_m(s.get('redirect_large_bps')))}", ""))
    rows.append(("peak RSS (MiB): regcache (any replica), SeaweedFS",
                 f"{_fmt(rss.get('regcache'), 0)}, {_fmt(rss.get('seaweed'), 0)}", ""))
    return ["", "The shared level (3 replicas, SeaweedFS):", "", "| measurement | regcache | reference |",
            "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
