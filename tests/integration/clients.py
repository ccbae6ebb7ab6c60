"""
Real registry clients for integration tests, each sealed so that its
fallback can never leave the machine.

- skopeo never falls back anywhere.
- containerd's ``server`` (the fallback) is a closed loopback port.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import List

from tests.integration.procs import closed_port


def skopeo_pull(ref: str, dest: str, creds: str = None, extra=(), timeout: float = 300,
                cert_dir: str = None) -> subprocess.CompletedProcess:
    """
    ``skopeo copy docker://ref dir:dest`` over plain HTTP, or over verified
    TLS trusting the CA certificates in ``cert_dir``; skopeo never falls back.
    """
    shutil.rmtree(dest, ignore_errors=True)
    tls = ["--src-tls-verify=true", "--src-cert-dir", cert_dir] if cert_dir else ["--src-tls-verify=false"]
    cmd = ["skopeo", "copy", *tls, *extra]
    if creds:
        cmd += ["--src-creds", creds]
    cmd += [f"docker://{ref}", f"dir:{dest}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def expected_files(image):
    """What `skopeo copy … dir:` must produce: every blob by hex, and the manifest."""
    files = {b.digest.split(":")[1]: b.digest.split(":")[1] for b in image.blobs()}
    files["manifest.json"] = image.digest.split(":")[1]
    return files


def dir_digests(dest: str) -> dict:
    """{file name: sha256 hex} of a skopeo dir: copy, manifest included."""
    import hashlib

    out = {}
    for name in os.listdir(dest):
        if name in ("version",) or name.startswith("signature"):
            continue
        h = hashlib.sha256()
        with open(os.path.join(dest, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


class Containerd:
    """
    A private containerd (own root, state and sockets; CRI disabled) and
    ``ctr`` pulls through a hosts directory whose fallback server is a
    closed port.
    """

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="regcache-ctd-")
        self.sock = os.path.join(self.dir, "containerd.sock")
        self.hosts = os.path.join(self.dir, "certs.d")
        self.proc = None

    def start(self) -> "Containerd":
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as f:
            f.write(f"""version = 2
root = "{self.dir}/root"
state = "{self.dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir}/opt"
""")
        self.log = open(os.path.join(self.dir, "containerd.log"), "wb")
        self.proc = subprocess.Popen(
            ["setsid", "containerd", "--config", config], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run(["ctr", "--address", self.sock, "version"], capture_output=True)
            if r.returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("containerd did not start: " + open(self.log.name).read()[-2000:])

    def mirror(self, registry: str, mirror_host: str, capabilities=("pull", "resolve"), headers=None,
               ca: str = None) -> None:
        """
        Route ``registry`` (e.g. docker.io) to the mirror, with a dead-end
        fallback: over plain HTTP, or over HTTPS trusting the CA file ``ca``;
        ``headers`` go to the mirror with every request (a
        ``[host."…".header]`` table: an Authorization, say).
        """
        d = os.path.join(self.hosts, registry)
        os.makedirs(d, exist_ok=True)
        caps = ", ".join(f'"{c}"' for c in capabilities)
        scheme = "https" if ca else "http"
        trust = f'  ca = "{ca}"\n' if ca else ""
        table = "".join(f'  {k} = "{v}"\n' for k, v in (headers or {}).items())
        with open(os.path.join(d, "hosts.toml"), "w") as f:
            f.write(f'server = "http://127.0.0.1:{closed_port()}"\n\n'
                    f'[host."{scheme}://{mirror_host}"]\n  capabilities = [{caps}]\n{trust}'
                    + (f'[host."{scheme}://{mirror_host}".header]\n{table}' if table else ""))

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ctr", "--address", self.sock, "-n", "test", *args], capture_output=True, text=True, timeout=timeout
        )

    def pull(self, ref: str, *extra: str) -> subprocess.CompletedProcess:
        return self.ctr("image", "pull", "--hosts-dir", self.hosts, *extra, ref)

    def images(self) -> List[str]:
        return self.ctr("image", "ls", "-q").stdout.split()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["umount", "-R", os.path.join(self.dir, "root")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class Podman:
    """
    podman with its own storage (vfs) and a registries.conf whose
    ``prefix`` registry's location is a closed port, so only the mirror
    (``mirror_host``, with a path if given one) can answer.
    """

    def __init__(self, mirror_host: str, prefix: str = "docker.io"):
        self.dir = tempfile.mkdtemp(prefix="regcache-podman-")
        self.conf = os.path.join(self.dir, "registries.conf")
        with open(self.conf, "w") as f:
            f.write(f"""short-name-mode = "disabled"
[[registry]]
prefix = "{prefix}"
location = "127.0.0.1:{closed_port()}"
insecure = true
[[registry.mirror]]
location = "{mirror_host}"
insecure = true
""")
        self.storage_conf = os.path.join(self.dir, "storage.conf")
        with open(self.storage_conf, "w") as f:
            f.write(f'[storage]\ndriver = "vfs"\ngraphroot = "{self.dir}/graph"\nrunroot = "{self.dir}/run"\n')
        os.makedirs(os.path.join(self.dir, "tmp"))

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=self.conf, CONTAINERS_STORAGE_CONF=self.storage_conf,
                   TMPDIR=os.path.join(self.dir, "tmp"))
        cmd = ["podman", "--root", f"{self.dir}/graph", "--runroot", f"{self.dir}/run", "--storage-driver", "vfs",
               "--events-backend", "none", "--cgroup-manager", "cgroupfs", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)

    def pull(self, ref: str) -> subprocess.CompletedProcess:
        return self.run("pull", ref)

    def digest(self, ref: str) -> str:
        return self.run("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()

    def cleanup(self) -> None:
        self.run("rmi", "--all", "--force")
        shutil.rmtree(self.dir, ignore_errors=True)
