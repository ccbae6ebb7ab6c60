"""
A real ``redis-server`` on loopback for the Redis leases' tests: no
persistence, killed after the test.  (apt redis-server; .ci/run installs it.)
"""

import shutil
import signal
import socket
import subprocess
import time

from tests.processes import free_port


class RedisServer:
    def __init__(self, log_path: str):
        self.port = free_port()
        self.log_path = log_path
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server: apt-get install redis-server (.ci/run installs it)")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20.0) -> None:
        """Until it answers PING with PONG."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {timeout}s")
            time.sleep(0.05)

    def keys(self, pattern: str):
        """The keys matching ``pattern``, asked over the wire (KEYS; a test's few)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"KEYS {pattern}\r\n".encode())
            return s.recv(65536).decode().split("\r\n")[2::2]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
