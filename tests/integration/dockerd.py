"""
dockerd as a real client, sealed in a network namespace that has only
loopback: its fallback to registry-1.docker.io cannot be turned off, so the
namespace is what guarantees it never reaches the internet.  Exactly one
port, the mirror's, is forwarded into the namespace.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from tests.integration.procs import tail

FORWARDER = r'''
import ctypes, os, socket, sys, threading
ns_path, port, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL("libc.so.6", use_errno=True)
CLONE_NEWNET = 0x40000000
home = os.open("/proc/self/ns/net", os.O_RDONLY)
ns = os.open(ns_path, os.O_RDONLY)
if libc.setns(ns, CLONE_NEWNET) != 0:
    raise OSError(ctypes.get_errno(), "setns into the namespace")
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
if libc.setns(home, CLONE_NEWNET) != 0:
    raise OSError(ctypes.get_errno(), "setns back home")
print("ready", flush=True)

def pipe(a, b):
    try:
        while True:
            data = a.recv(1 << 16)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

while True:
    conn, _ = listener.accept()
    try:
        up = socket.create_connection(("127.0.0.1", target))
    except OSError:
        conn.close()
        continue
    threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
    threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
'''


def available() -> str:
    """Why dockerd cannot run here, or '' if it can."""
    for tool in ("dockerd", "docker", "ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    return ""


class SealedDockerd:
    def __init__(self, mirror_port: int):
        self.mirror_port = mirror_port
        self.dir = tempfile.mkdtemp(prefix="regcache-dockerd-")
        self.ns = "regcache-" + uuid.uuid4().hex[:8]
        self.sock = os.path.join(self.dir, "docker.sock")
        self.plugins_existed = os.path.exists("/run/docker/plugins")
        self.procs = []

    def _run(self, *cmd, check=True):
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)

    def start(self) -> "SealedDockerd":
        self._run("ip", "netns", "add", self.ns)
        self._run("ip", "-n", self.ns, "link", "set", "lo", "up")
        self._check_sealed()
        # Its stderr goes to a file: a pipe that nobody reads once it is up
        # would stop it when full.  stdout says "ready", once.
        fwd_log = os.path.join(self.dir, "forwarder.log")
        with open(fwd_log, "wb") as err:
            fwd = subprocess.Popen(
                [sys.executable, "-c", FORWARDER, f"/run/netns/{self.ns}", str(self.mirror_port), str(self.mirror_port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
            )
        self.procs.append(fwd)
        if fwd.stdout.readline().strip() != "ready":
            raise RuntimeError("forwarder failed: " + tail(fwd_log))
        config = os.path.join(self.dir, "daemon.json")
        with open(config, "w") as f:
            json.dump({"deprecated-key-path": os.path.join(self.dir, "key.json")}, f)
        self.log = open(os.path.join(self.dir, "dockerd.log"), "wb")
        dockerd = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--mount", "--propagation", "slave",
             "dockerd", "--config-file", config,
             "--data-root", os.path.join(self.dir, "data"), "--exec-root", os.path.join(self.dir, "exec"),
             "--pidfile", os.path.join(self.dir, "docker.pid"), "-H", f"unix://{self.sock}",
             "--storage-driver", "vfs", "--iptables=false", "--ip-masq=false", "--ip-forward=false",
             "--bridge=none", "--userland-proxy=false",
             "--registry-mirror", f"http://127.0.0.1:{self.mirror_port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(dockerd)
        deadline = time.monotonic() + 60
        while self.docker("version").returncode != 0:
            if dockerd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dockerd did not start: " + open(self.log.name).read()[-3000:])
            time.sleep(0.2)
        return self

    def _check_sealed(self) -> None:
        """
        Only lo and no routes: nothing dockerd sends can leave the namespace.
        (No probe of an outside address is made to prove it.)
        """
        links = self._run("ip", "-n", self.ns, "-o", "link").stdout
        names = [line.split(":")[1].strip() for line in links.splitlines()]
        if names != ["lo"]:
            raise RuntimeError(f"namespace has more than lo: {names}")
        for family in ("-4", "-6"):
            if self._run("ip", family, "-n", self.ns, "route").stdout.strip():
                raise RuntimeError(f"namespace has {family} routes")

    def docker(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", f"unix://{self.sock}", *args],
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM) if p is self.procs[-1] else p.terminate()
                    p.wait(timeout=30)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    p.kill()
                    p.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        if not self.plugins_existed:
            shutil.rmtree("/run/docker/plugins", ignore_errors=True)
        subprocess.run(["umount", "-R", os.path.join(self.dir, "data")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
