"""
Real processes for integration tests: regcache under twistd, on loopback.

pytest holds no reactor: every server a test talks to is a subprocess, and
the test talks to it with plain sockets, urllib, skopeo or ctr.
"""

import glob
import os
import re
import resource
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import List, NoReturn, Optional

from prometheus_client.parser import text_string_to_metric_families

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


def scrape(url: str):
    """{(sample name, frozenset of labels): value} of one /metrics page, read with prometheus_client's parser."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


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

    A port this helper picks (no ``port`` or ``listen`` given) was free a
    moment before the process binds it, and another process (a parallel
    test run) may take it in between: a start that finds it taken picks
    another, up to PORT_TRIES times, and a start counts only once this
    process says it listens there, not when whatever holds the port answers.
    """

    PORT_TRIES = 5

    def __init__(self, storage: str, upstream: Optional[str], args: List[str] = (), env=None, port: int = None,
                 listen: Optional[str] = None, ca: Optional[str] = None, open_files: Optional[int] = None):
        self.storage = storage
        #: The process's open-file limit (soft and hard), as a small host would set it.
        self.open_files = open_files
        self.upstream = upstream
        self.args = list(args)
        #: For an ``ssl:`` listen: the CA file the test's own requests trust, and https URLs.
        self.context = ssl.create_default_context(cafile=ca) if ca else None
        self._scheme = "https" if ca else "http"
        self._picked = port is None and listen is None
        self._use(port or free_port(), listen)
        self.log_path = storage.rstrip("/") + ".log"
        self.stderr_path = storage.rstrip("/") + ".stderr"
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")
        self.proc: Optional[subprocess.Popen] = None

    def _use(self, port: int, listen: Optional[str] = None) -> None:
        self.port = port
        #: A Twisted endpoint on self.port; plain TCP unless told otherwise.
        self.listen = listen or f"tcp:{port}:interface=127.0.0.1"
        self.url = f"{self._scheme}://127.0.0.1:{port}"
        self.host = f"127.0.0.1:{port}"

    def start(self, wait: bool = True) -> "Regcache":
        tries = 0
        while True:
            tries += 1
            cmd = [
                TWISTD, "-n", "--pidfile=", "-l", self.log_path, "regcache",
                "--listen", self.listen,
                "--storage", self.storage, *(["--upstream", self.upstream] if self.upstream else []), *self.args,
            ]
            logged = self._log_size()
            indexed = self._indexed()
            with open(self.stderr_path, "ab") as stderr:
                self.proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=stderr, preexec_fn=self._limits if self.open_files else None)
            if not wait:
                return self
            try:
                wait_http(self.url + "/readyz", proc=self.proc, context=self.context)
                wait_for(lambda: self._listening(logged) or self.proc.poll() is not None, 20,
                         "regcache to say it listens, or to exit")
                if self.proc.poll() is None:
                    # /readyz does not wait for the start-up index; the tests
                    # that evict or count what is cached need it done.
                    wait_for(lambda: self._indexed() > indexed, timeout=60, what="the start-up index")
                    return self
                why = f"process exited with {self.proc.returncode}; another process answered on port {self.port}"
            except (RuntimeError, TimeoutError, AssertionError) as e:
                why = str(e)
            # Only the default listen is made again on another port: one a
            # test wrote (TLS, say) is its own, and it is not rewritten.
            if not (self._picked and self.listen == f"tcp:{self.port}:interface=127.0.0.1" and tries < self.PORT_TRIES
                    and self.proc.poll() is not None and "Address already in use" in self._log_since(logged)):
                self.failed(why)
            self._use(free_port())

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        """What the log gained since it was ``offset`` bytes long (all of it, if it rotated meanwhile)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset if os.path.getsize(self.log_path) >= offset else 0)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _listening(self, offset: int) -> bool:
        """Whether this start's log says it serves on self.port (always, for a listen with no port)."""
        if not self.listen.startswith(("tcp:", "ssl:")):
            return True
        return re.search(rf"regcache serving .*? on \S*:{self.port}\b", self._log_since(offset)) is not None

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
        """
        The whole log, oldest first: twistd rotates it at 1 MB (to ``.1``,
        the older ones to ``.2``, ``.3``...), and a busy run, the soak, writes
        several; the current file alone would hide what came first.
        """
        rotated = [path for path in glob.glob(glob.escape(self.log_path) + ".*")
                   if path.rsplit(".", 1)[1].isdigit()]
        rotated.sort(key=lambda path: int(path.rsplit(".", 1)[1]), reverse=True)
        text = []
        for path in rotated + [self.log_path]:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text.append(f.read())
            except FileNotFoundError:
                continue
        return "".join(text)

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
