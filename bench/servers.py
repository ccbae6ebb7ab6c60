"""
The processes of one bench run, all on 127.0.0.1: the token server, the
upstream registry, the switch in front of them, the mirrors under test and
nginx.

Each is a subprocess with its log in the run directory, started and waited
for here and stopped by the pid this module holds (never by name).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CLK_TCK = os.sysconf("SC_CLK_TCK")

ISSUER = "regcache-bench-token"
SERVICE = "regcache-bench-upstream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers anything at all (a 401 counts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s")
            time.sleep(0.05)


class Process:
    """One subprocess, its log file, and its resource use from /proc."""

    def __init__(self, name: str, cmd: List[str], log: str, env=None):
        self.name = name
        self.cmd = cmd
        self.log = log
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.final: Dict[str, float] = {}

    def start(self) -> "Process":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL)
        out.close()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def usage(self) -> Dict[str, float]:
        """Peak RSS (VmHWM, MiB) and CPU seconds (user + system) so far."""
        if self.proc is None or self.proc.poll() is not None:
            return dict(self.final)
        try:
            with open(f"/proc/{self.pid}/status") as f:
                hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, StopIteration):
            return dict(self.final)
        self.final = {"rss_mib": hwm / 1024, "cpu_s": cpu}
        return dict(self.final)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.usage()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Mirror:
    """A mirror under test: its base URL (host:port) and its process."""

    kind = "mirror"

    def __init__(self, label: str, run_dir: str, upstream_url: str):
        self.label = label
        self.run_dir = run_dir
        self.upstream_url = upstream_url
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.process: Optional[Process] = None
        self.storage = ""

    def start(self, storage: str, **options) -> "Mirror":
        raise NotImplementedError

    def stop(self) -> Dict[str, float]:
        self.process.stop()
        return self.process.usage()


class Regcache(Mirror):
    kind = "regcache"

    def start(self, storage: str, tag_ttl: Optional[str] = None, extra=()) -> "Regcache":
        self.storage = storage
        os.makedirs(storage, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [TWISTD, "-n", "--pidfile=", "-l", storage + ".log", "regcache",
               "--listen", f"tcp:{self.port}:interface=127.0.0.1",
               "--storage", storage, "--upstream", self.upstream_url, *extra]
        if tag_ttl:
            cmd += ["--tag-ttl", tag_ttl]
        self.process = Process(self.label, cmd, storage + ".out", env).start()
        wait_http(self.url + "/readyz", self.process.proc)
        return self


class Reference(Mirror):
    """distribution's registry in proxy mode: what users run today."""

    kind = "reference"

    def start(self, storage: str, **_) -> "Reference":
        self.storage = storage
        os.makedirs(storage, exist_ok=True)
        config = storage + ".yml"
        _write_yaml(config, {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": storage}, "cache": {"blobdescriptor": "inmemory"}},
            "http": {"addr": self.host, "secret": "regcache-bench"},
            "proxy": {"remoteurl": self.upstream_url},
        })
        self.process = Process(self.label, ["docker-registry", "serve", config], storage + ".log").start()
        wait_http(self.url + "/v2/", self.process.proc)
        return self


class Upstream:
    """
    A plain docker-registry with token auth like Docker Hub's, its token
    server, and the switch in front of both.  Mirrors and direct pulls go
    through the switch; pushes too, so the realm the registry announces is the
    switched one.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.registry_port = free_port()
        self.token_port = free_port()
        self.port = free_port()  # the switched registry port: what mirrors use
        self.token_switch_port = free_port()
        self.control_port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.storage = os.path.join(run_dir, "upstream")
        self.log = os.path.join(run_dir, "upstream.log")
        self.processes: List[Process] = []

    def start(self) -> "Upstream":
        from bench import tokens

        key, cert = os.path.join(self.run_dir, "token.key"), os.path.join(self.run_dir, "token.crt")
        tokens.make_key_and_cert(key, cert)
        py = sys.executable
        env = dict(os.environ, PYTHONPATH=REPO)
        self.processes.append(Process(
            "tokens", [py, "-m", "bench.tokens", str(self.token_port), key, cert, ISSUER, SERVICE],
            os.path.join(self.run_dir, "tokens.log"), env).start())
        self.processes.append(Process(
            "switch", [py, "-m", "bench.switch", str(self.control_port),
                       f"{self.port}:{self.registry_port}", f"{self.token_switch_port}:{self.token_port}"],
            os.path.join(self.run_dir, "switch.log"), env).start())
        config = os.path.join(self.run_dir, "upstream.yml")
        _write_yaml(config, {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json"},
            "storage": {"filesystem": {"rootdirectory": self.storage}, "cache": {"blobdescriptor": "inmemory"}},
            "http": {"addr": f"127.0.0.1:{self.registry_port}", "secret": "regcache-bench-upstream"},
            "auth": {"token": {
                "realm": f"http://127.0.0.1:{self.token_switch_port}/token",
                "service": SERVICE, "issuer": ISSUER, "rootcertbundle": cert,
            }},
        })
        registry = Process("upstream", ["docker-registry", "serve", config], self.log).start()
        self.processes.append(registry)
        wait_http(f"http://127.0.0.1:{self.registry_port}/v2/", registry.proc)
        wait_http(self.url + "/v2/", registry.proc)
        wait_http(f"http://127.0.0.1:{self.token_switch_port}/token", registry.proc)
        return self

    def cpu_s(self) -> float:
        """CPU seconds used so far by the upstream registry, its token server and the switch."""
        return sum(p.usage().get("cpu_s", 0.0) for p in self.processes)

    def switch(self, mode: str) -> None:
        from bench.switch import set_mode

        set_mode(self.control_port, mode)

    def log_offset(self) -> int:
        return os.path.getsize(self.log)

    def blob_serves(self, digest: str, since: int = 0) -> Dict[str, int]:
        """
        How often the upstream answered a GET of blob ``digest`` (200 or
        206) since log offset ``since``, and the bytes it wrote for them.
        """
        gets, written = 0, 0
        with open(self.log, "rb") as f:
            f.seek(since)
            for line in f:
                if b"response completed" not in line or digest.encode() not in line:
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if (e.get("http.request.method") == "GET" and "/blobs/" in e.get("http.request.uri", "")
                        and e.get("http.response.status") in (200, 206)):
                    gets += 1
                    written += int(e.get("http.response.written", 0))
        return {"gets": gets, "bytes": written}

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()


class Nginx:
    """
    nginx with sendfile serving one file: the practical limit for a warm
    blob.  ``static`` adds exact paths served from files with given headers
    (a cached manifest's bytes under the URL and headers a mirror answers
    with): the practical limit for a manifest.
    """

    def __init__(self, run_dir: str, file_path: str, static=()):
        self.dir = os.path.join(run_dir, "nginx")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/blob"
        self.file_path = file_path
        #: (URL path, file, {header: value}) each.
        self.static = list(static)
        self.process: Optional[Process] = None

    def start(self) -> "Nginx":
        os.makedirs(os.path.join(self.dir, "www"), exist_ok=True)
        link = os.path.join(self.dir, "www", "blob")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(self.file_path, link)
        conf = os.path.join(self.dir, "nginx.conf")
        d = self.dir
        locations = []
        for path, file, headers in self.static:
            lines = [f'alias {file};', 'types { }', f'default_type "{headers["Content-Type"]}";', "etag off;"]
            lines += [f"add_header {k} '{v}' always;" for k, v in headers.items() if k != "Content-Type"]
            locations.append(f"location = {path} {{ {' '.join(lines)} }}")
        static = "\n    ".join(locations)
        with open(conf, "w") as f:
            f.write(f"""
daemon off;
master_process on;
worker_processes auto;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  sendfile on;
  tcp_nopush on;
  access_log off;
  default_type application/octet-stream;
  client_body_temp_path {d}/tmp-body;
  proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fcgi;
  uwsgi_temp_path {d}/tmp-uwsgi;
  scgi_temp_path {d}/tmp-scgi;
  server {{
    listen 127.0.0.1:{self.port};
    location / {{ root {d}/www; }}
    {static}
  }}
}}
""")
        self.process = Process("nginx", ["nginx", "-c", conf, "-p", d], os.path.join(d, "out.log")).start()
        wait_http(self.url.rsplit("/", 1)[0] + "/", self.process.proc)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGQUIT)


def _write_yaml(path: str, doc) -> None:
    """YAML is a superset of JSON: distribution reads this as its config."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _blob_file(storage: str, digest: str) -> Optional[str]:
    """Where distribution's filesystem driver keeps blob ``digest``."""
    alg, hexd = digest.split(":")
    path = os.path.join(storage, "docker", "registry", "v2", "blobs", alg, hexd[:2], hexd, "data")
    return path if os.path.exists(path) else None


def push(upstream: Upstream, image) -> None:
    """Copy one image from its OCI layout into the upstream, digests unchanged."""
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"]
    if image.is_index:
        cmd.append("--all")
    cmd += [f"oci:{image.layout}:{image.ref}", f"docker://{upstream.host}/{image.name}:{image.tag}"]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, timeout=300)


