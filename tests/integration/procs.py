"""
Real processes for integration tests: regcache under twistd, on loopback.

pytest holds no reactor: every server a test talks to is a subprocess, and
the test talks to it with plain sockets, urllib, skopeo or ctr.
"""

import os
import resource
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, NoReturn, Optional

from tests.processes import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def closed_port() -> int:
    """A loopback port nothing listens on: where client fallbacks are sent to die."""
    return free_port()


def wait_http(url: str, timeout: float = 20.0, proc: Optional[subprocess.Popen] = None, context=None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s")
            time.sleep(0.05)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """
    ``predicate()``'s first truthy result, polled until ``timeout``: for a
    state a process reaches in its own time, never a wait on a clock.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def tail(path: str, size: int = 3000) -> str:
    """The last ``size`` characters of a file, or "" if there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(os.path.getsize(path) - size, 0))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


class Regcache:
    """
    ``twistd -n regcache`` as a subprocess on 127.0.0.1 (``upstream`` None
    when ``args`` give a ``--config`` file instead), its log in a file
    beside the storage directory, and its stderr (what happens before the
    log starts: a bad option, an import error) in another.  Never a pipe:
    nobody reads one while the test runs, and a full pipe stops the process.
    """

    def __init__(self, storage: str, upstream: Optional[str], args: List[str] = (), env=None, port: int = None,
                 listen: Optional[str] = None, ca: Optional[str] = None, open_files: Optional[int] = None):
        self.storage = storage
        #: The process's open-file limit (soft and hard), as a small host would set it.
        self.open_files = open_files
        self.upstream = upstream
        self.args = list(args)
        self.port = port or free_port()
        #: A Twisted endpoint on self.port; plain TCP unless told otherwise.
        self.listen = listen or f"tcp:{self.port}:interface=127.0.0.1"
        #: For an ``ssl:`` listen: the CA file the test's own requests trust, and https URLs.
        self.context = ssl.create_default_context(cafile=ca) if ca else None
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = storage.rstrip("/") + ".log"
        self.stderr_path = storage.rstrip("/") + ".stderr"
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")
        self.proc: Optional[subprocess.Popen] = None

    def start(self, wait: bool = True) -> "Regcache":
        cmd = [
            TWISTD, "-n", "--pidfile=", "-l", self.log_path, "regcache",
            "--listen", self.listen,
            "--storage", self.storage, *(["--upstream", self.upstream] if self.upstream else []), *self.args,
        ]
        indexed = self._indexed()
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr, preexec_fn=self._limits if self.open_files else None)
        if wait:
            try:
                wait_http(self.url + "/readyz", proc=self.proc, context=self.context)
                # /readyz does not wait for the start-up index; the tests
                # that evict or count what is cached need it done.
                wait_for(lambda: self._indexed() > indexed, timeout=60, what="the start-up index")
            except (RuntimeError, TimeoutError, AssertionError) as e:
                self.failed(str(e))
        return self

    def _indexed(self) -> int:
        """How many start-up indexes this log records as ended (done or failed)."""
        log = self.log()
        return log.count("Indexed ") + log.count("Indexing the store failed")

    def _limits(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def failed(self, why: str) -> NoReturn:
        """
        A start went wrong: stop the process and raise with the ends of
        its stderr and log, which say why.
        """
        self.kill()
        raise RuntimeError(f"regcache did not start: {why}\n"
                           f"--- {self.stderr_path}:\n{tail(self.stderr_path)}\n"
                           f"--- {self.log_path}:\n{tail(self.log_path)}")

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def restart(self) -> "Regcache":
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def get(self, path: str, method: str = "GET", headers=None, timeout: float = 60):
        """(status, headers, body) of one request; errors are answers too."""
        req = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.context) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
