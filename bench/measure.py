"""
One measurement each: a skopeo pull, curl streams of a blob, a wrk or ab
load of a manifest URL.  Every load is bounded in time and count, and every
URL is on 127.0.0.1.

The clients are the ones users have (skopeo, curl) or the usual load tools
(wrk; ab for HEAD, which wrk cannot send).  They share the machine's two
cores with the server, which is why the bench compares mirrors side by side
rather than trusting absolute numbers.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import IO, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
#: The clients' copies, per bench process: a run's cleanup must not take
#: the copies of another run going on at the same time.
SCRATCH = f"/dev/shm/regcache-bench-{os.getpid()}"


class PullFailed(Exception):
    pass


def _scratch(name: str) -> str:
    path = os.path.join(SCRATCH, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


@dataclass
class Pull:
    """
    A skopeo pull under way.  Its stderr goes to a temporary file, not a
    pipe: pulls started together are waited for one at a time, and one
    that filled a pipe in the meantime would stall, and skew the timing.
    """

    proc: subprocess.Popen
    errors: IO[bytes]


def start_pull(host: str, image, dest: str, by_digest: bool = False) -> Pull:
    ref = f"{image.name}@{image.digest}" if by_digest else f"{image.name}:{image.tag}"
    cmd = ["skopeo", "copy", "--quiet", "--src-tls-verify=false"]
    if image.is_index:
        cmd.append("--all")
    cmd += [f"docker://{host}/{ref}", f"dir:{dest}"]
    errors = tempfile.TemporaryFile()
    return Pull(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors), errors)


def finish_pull(p: Pull, image, dest: str, timeout: float, full_hash: bool) -> None:
    """Wait for a pull, then check what it wrote; raises PullFailed."""
    with p.errors:
        try:
            p.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
            raise PullFailed(f"skopeo did not finish within {timeout:.0f}s")
        if p.proc.returncode != 0:
            p.errors.seek(0)
            raise PullFailed(p.errors.read().decode(errors="replace").strip()[-300:])
    verify(image, dest, full_hash)


def pull(host: str, image, timeout: float = 120, full_hash: bool = True, name: str = "pull") -> float:
    """Seconds for one skopeo pull of ``image`` from ``host``, verified."""
    dest = _scratch(name)
    t = time.monotonic()
    p = start_pull(host, image, dest)
    try:
        finish_pull(p, image, dest, timeout, full_hash=False)
        took = time.monotonic() - t
        verify(image, dest, full_hash)
        return took
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def concurrent_pulls(host: str, image, n: int, timeout: float = 300) -> float:
    """Wall seconds for ``n`` skopeo pulls started at once, all verified."""
    dests = [_scratch(f"pull-{i}") for i in range(n)]
    t = time.monotonic()
    pulls = [start_pull(host, image, d) for d in dests]
    errors = []
    try:
        for i, (p, d) in enumerate(zip(pulls, dests)):
            try:
                finish_pull(p, image, d, max(timeout - (time.monotonic() - t), 1), full_hash=False)
            except PullFailed as e:
                errors.append(str(e))
        took = time.monotonic() - t
        if errors:
            raise PullFailed(f"{len(errors)} of {n} pulls failed: {errors[0]}")
        # skopeo checks every blob's digest as it copies; hash one copy here too.
        verify(image, dests[0], full_hash=True)
        return took
    finally:
        for d in dests:
            shutil.rmtree(d, ignore_errors=True)


def verify(image, dest: str, full_hash: bool) -> None:
    """The pulled manifest is the one pushed, byte for byte; the layers are whole."""
    with open(os.path.join(dest, "manifest.json"), "rb") as f:
        got = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    if got != image.digest:
        raise PullFailed(f"pulled manifest {got} is not {image.digest}")
    for layer in image.layers:
        path = os.path.join(dest, layer["digest"].split(":")[1])
        if not os.path.exists(path) or os.path.getsize(path) != layer["size"]:
            raise PullFailed(f"layer {layer['digest']} missing or truncated")
        if full_hash:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if "sha256:" + h.hexdigest() != layer["digest"]:
                raise PullFailed(f"layer {layer['digest']} has the wrong bytes")


def streams(url: str, n: int, size: int, timeout: float = 120, follow: bool = False) -> Dict[str, float]:
    """
    ``n`` curl downloads of ``url`` at once, measured as users feel them;
    ``follow``: through a redirect (regcache's ``--s3-redirect``).

    - ``aggregate``: all bytes over the wall-clock time from the first
      request sent to the last byte received: the headline figure.
    - ``fairness``: the slowest stream's speed over the median stream's.
    - ``sum``: the sum of each stream's own speed, a secondary figure only:
      when streams do not finish together it is more than the clients got.

    The curls start first and wait for their URL on stdin (``-K -``), so the
    clock starts when the first of them is told to go, not while processes
    are still being forked; it stops when the last one has exited, after its
    last byte.  Process exit is a little after the last byte, so the figure
    errs low, equally for every server.
    """
    cmd = ["curl", "-sS", "-K", "-", "-o", "/dev/null", "--max-time", str(int(timeout)),
           "-w", "%{speed_download} %{size_download} %{http_code}", *(["-L"] if follow else [])]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(n)]
    config = f'url = "{url}"\n'.encode()
    t = time.monotonic()
    for p in procs:
        p.stdin.write(config)
        p.stdin.close()
    speeds = []
    failed = None
    for p in procs:
        p.wait(timeout=timeout + 30)  # its few bytes of output fit the pipes
        out, err = p.stdout.read(), p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        try:
            speed, got, code = out.decode().split()
        except ValueError:
            speed, got, code = "0", "0", "none"
        if code != "200" or int(got) != size:
            failed = failed or f"curl {url}: {code}, {got} of {size} bytes {err.decode()[-200:]}"
        speeds.append(float(speed))
    wall = time.monotonic() - t
    if failed:
        raise PullFailed(failed)
    return {"aggregate": n * size / wall, "wall_s": wall, "fairness": min(speeds) / median(speeds),
            "sum": sum(speeds), "speeds": speeds}


def bearer(registry: str, repository: str) -> str:
    """A pull token for ``repository`` from the realm ``registry`` challenges with, as a client gets one."""
    req = urllib.request.Request(registry + "/v2/")
    try:
        urllib.request.urlopen(req, timeout=30).close()
        return ""  # no auth
    except urllib.error.HTTPError as e:
        challenge = e.headers.get("WWW-Authenticate", "")
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    url = f"{params['realm']}?service={urllib.parse.quote(params['service'])}&scope=repository:{repository}:pull"
    code, body = _http(url)
    if code != 200:
        raise PullFailed(f"token for {repository}: {code}")
    doc = json.loads(body)
    return doc.get("token") or doc["access_token"]


def first_byte(url: str, token: str = "", timeout: float = 60) -> Dict[str, float]:
    """
    One curl GET of ``url``: seconds to the first byte of the answer
    (``time_starttransfer``, connect included) and to the last; raises
    unless it is a 200.
    """
    cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(int(timeout)),
           "-w", "%{time_starttransfer} %{time_total} %{http_code}", url]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10).stdout
    try:
        ttfb, total, code = out.split()
    except ValueError:
        raise PullFailed(f"curl {url}: {out[-200:]}")
    if code != "200":
        raise PullFailed(f"curl {url}: {code}")
    return {"ttfb_s": float(ttfb), "total_s": float(total)}


#: regcache's log line when its start-up index is built (expiry.py).
INDEXED = re.compile(r"Indexed \d+ cached files, \d+ bytes, in ([\d.]+)s")
EVICTED = re.compile(r"Evicted (?P<entries>\d+) entries \((?P<manifests>\d+) manifests\), (?P<freed>\d+) bytes, "
                     r"in (?P<delete_s>[\d.]+)s(?: \(chosen in (?P<chose_s>[\d.]+)s on the reactor\))?: "
                     r"store (?P<before>\d+) -> (?P<after>\d+) bytes")


def index_seconds(log_path: str, run: int, timeout: float = 60) -> float:
    """
    The start-up index's own time in the ``run``-th start of a regcache
    whose log is ``log_path`` (the index may finish after /readyz answers).
    """
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, errors="replace") as f:
            found = INDEXED.findall(f.read())
        if len(found) >= run:
            return float(found[run - 1])
        if time.monotonic() > deadline:
            raise TimeoutError(f"no start-up index in {log_path} within {timeout:.0f}s")
        time.sleep(0.05)


def _http(url: str, method: str = "GET", headers=None, timeout: float = 30):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str, method: str = "GET", timeout: float = 30) -> float:
    """Seconds for one manifest request with the manifest Accept list; raises unless 200."""
    t = time.monotonic()
    code, _ = _http(url, method, {"Accept": ACCEPT}, timeout)
    if code != 200:
        raise PullFailed(f"{method} {url}: {code}")
    return time.monotonic() - t


def wrk(url: str, seconds: float, connections: int) -> Dict[str, float]:
    """GET load: requests/s and p99 latency (ms) from wrk, with the Accept header set in Lua."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s",
           "-s", os.path.join(HERE, "accept.lua"), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"^BENCH (.*)$", out, re.M)
    if not m:
        raise PullFailed(f"wrk printed no result: {out[-300:]}")
    r = json.loads(m.group(1))
    return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "errors": r["errors"], "requests": r["requests"]}


def ab_head(url: str, seconds: float, connections: int) -> Dict[str, float]:
    """HEAD load with ab -i (keep-alive): requests/s and p99 latency (ms)."""
    cmd = ["ab", "-i", "-k", "-q", "-c", str(connections), "-t", str(seconds), "-n", "2000000",
           "-H", f"Accept: {ACCEPT}", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = re.search(r"Requests per second:\s+([\d.]+)", out)
    p50 = re.search(r"^\s*50%\s+(\d+)", out, re.M)
    p99 = re.search(r"^\s*99%\s+(\d+)", out, re.M)
    done = re.search(r"Complete requests:\s+(\d+)", out)
    if not (rps and p99 and done):
        raise PullFailed(f"ab printed no result: {out[-300:]}")
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    errors = int(failed.group(1)) + (int(non2xx.group(1)) if non2xx else 0)
    return {"rps": float(rps.group(1)), "p50_ms": float(p50.group(1)), "p99_ms": float(p99.group(1)), "errors": errors,
            "requests": int(done.group(1))}


def median(values: List[float]) -> Optional[float]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
