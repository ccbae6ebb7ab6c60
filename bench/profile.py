"""
``python -m bench.profile``: where regcache spends its CPU, with py-spy.

It starts the bench's upstream and one regcache, then samples regcache with
``py-spy record`` during four workloads: cold downloads of the large blob
(the fill and one follower), a wrk load on a cached manifest by digest, and
1 and 8 curl streams of the cached blob.  For each it prints the functions with
the most samples, by own time and inclusive, and ``strace -c`` of the blob
workloads (is it really sendfile?), into ``bench/results/profile.md``.  The
raw collapsed stacks stay in the work directory for flame graphs.

py-spy slows the process it samples, so these runs are separate from the
bench's figures.
"""

import argparse
import collections
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

from bench import images as image_builder
from bench import measure, servers


OUTER = {
    "run", "runApp", "runReactorWithLogging", "ApplicationRunner.run", "ApplicationRunner.startReactor",
    "UnixApplicationRunner.postApplication", "ReactorBase.run", "ReactorBase.mainLoop", "EPollReactor.doPoll",
    "callWithLogger", "callWithContext", "ContextTracker.callWithContext",
    "ThreadedContextTracker.callWithContext", "_PollLikeMixin._doReadOrWrite",
}


def summarize(path: str, top: int = 15) -> str:
    own, incl, total = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for name in {fr.split(" (")[0] for fr in frames}:
                incl[name] += n
    if not total:
        return "no samples\n"
    out = [f"{total} samples", "", "| own % | function (file:line) |", "|---|---|"]
    out += [f"| {n / total * 100:.1f} | `{f}` |" for f, n in own.most_common(top)]
    out += ["", "| inclusive % | function |", "|---|---|"]
    # Skip the reactor loop and what calls it: every sample has them.
    common = [f for f, n in incl.most_common() if f not in OUTER and not f.startswith("<")]
    out += [f"| {incl[f] / total * 100:.1f} | `{f}` |" for f in common[: top * 2]]
    return "\n".join(out) + "\n"


class Sampler:
    """py-spy record and strace -c on one pid while a workload runs."""

    def __init__(self, pid: int, out: str, strace: bool):
        self.procs = [subprocess.Popen(
            ["py-spy", "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", out + ".txt",
             "--nonblocking", "-d", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        if strace and shutil.which("strace"):
            self.procs.append(subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out + ".strace"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.profile")
    p.add_argument("--workdir", default="/var/tmp/regcache-bench")
    p.add_argument("--large-mib", type=int, default=512)
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if not shutil.which("py-spy"):
        sys.exit("py-spy is needed: pip install py-spy")
    run_dir = os.path.join(args.workdir, "profile")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    imgs = image_builder.build(args.workdir, args.large_mib)
    large = imgs["large"].layers[0]
    upstream = servers.Upstream(run_dir).start()
    rc = None
    report = ["# regcache profile (py-spy)", ""]
    try:
        for image in imgs.values():
            servers.push(upstream, image)
        rc = servers.Regcache("regcache", run_dir, upstream.url).start(os.path.join(run_dir, "rc"))
        pid = rc.process.pid
        blob_url = f"{rc.url}/v2/{imgs['large'].name}/blobs/{large['digest']}"
        blob_file = os.path.join(rc.storage, "blobs", "sha256", large["digest"][7:9], large["digest"][7:])

        def landed() -> None:
            for _ in range(200):  # the commit (fsync, rename) lands after the last byte
                if os.path.exists(blob_file):
                    return
                time.sleep(0.1)

        def cold(n: int) -> None:
            for _ in range(n):
                subprocess.run(["curl", "-sS", "-o", "/dev/null", blob_url], check=True)
                landed()
                os.unlink(blob_file)

        workloads = [
            ("cold", "4 cold downloads of the large blob (fill + one follower)", lambda: cold(4), True),
            ("manifest", "wrk, 32 connections, 5 s: GET a cached manifest by digest",
             lambda: measure.wrk(f"{rc.url}/v2/{imgs['small'].name}/manifests/{imgs['small'].digest}", 5, 32),
             False),
            ("streams1", "8 × 1 curl stream of the cached large blob",
             lambda: [measure.streams(blob_url, 1, large["size"]) for _ in range(8)], True),
            ("streams", "3 × 8 curl streams of the cached large blob",
             lambda: [measure.streams(blob_url, 8, large["size"]) for _ in range(3)], True),
        ]
        measure.pull(rc.host, imgs["small"], full_hash=False)
        for name, title, work, strace in workloads:
            if name == "streams1":
                subprocess.run(["curl", "-sS", "-o", "/dev/null", blob_url], check=True)
                landed()
            print(f"profiling: {title}", flush=True)
            out = os.path.join(run_dir, f"profile-{name}")
            s = Sampler(pid, out, strace)
            try:
                work()
            finally:
                s.stop()
            report += [f"## {title}", "", summarize(out + ".txt")]
            if os.path.exists(out + ".strace"):
                with open(out + ".strace") as f:
                    report += ["strace -c:", "", "```", *f.read().splitlines()[:12], "```", ""]
    finally:
        if rc is not None:
            rc.stop()
        upstream.stop()
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "profile.md")
    with open(path, "w") as f:
        f.write("\n".join(report))
    print(f"wrote {path}; raw stacks in {run_dir}/profile-*.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
