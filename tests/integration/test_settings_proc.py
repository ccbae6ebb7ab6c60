# test-case-name: tests.integration.test_settings_proc
"""
Start-up and settings with real processes: what an operator sees when the
README's command cannot run (the port is taken, the TLS key is missing, the
port is not a number), an upstream given with its /v2 path, and /readyz
following the store's state.
"""

import socket
import subprocess
import time

import pytest

from tests.integration.procs import TWISTD, Regcache, closed_port
from tests.support import small_filesystem
from tests.test_hub import ALL

#: How long a process that cannot start may take to say so and exit.
EXIT_BOUND = 30


def run_to_exit(tmp_path, *args):
    """
    (exit status, stderr lines, log) of ``twistd -n regcache`` that is
    expected to stop on its own within EXIT_BOUND seconds.  A setting that
    is wrong in itself is reported on stderr before logging starts; one
    that fails once the application starts (a port that cannot listen) is
    reported in the log, where twistd has sent stderr by then.
    """
    log = tmp_path / "regcache.log"
    cmd = [TWISTD, "-n", "--pidfile=", "-l", str(log), "regcache", "--storage", str(tmp_path / "store"),
           "--upstream", f"http://127.0.0.1:{closed_port()}", *args]
    r = Regcache(str(tmp_path / "store"), "")
    done = subprocess.run(cmd, env=r.env, capture_output=True, text=True, timeout=EXIT_BOUND)
    text = log.read_text() if log.exists() else ""
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()], text


def test_port_in_use_exits_with_one_line(tmp_path):
    """
    A port already taken ends the process with a non-zero status and one
    line naming the endpoint; no traceback, and no "serving" line, since it
    never served.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        status, _, log = run_to_exit(tmp_path, "--listen", listen)
    assert status != 0
    assert failures(log) == [f"regcache: --listen: cannot listen on {listen!r}: Address already in use"]
    assert "Traceback" not in log
    assert "regcache serving" not in log


def failures(log):
    """The messages of the log's critical and error lines, without their timestamp and namespace."""
    return [line.split("] ", 1)[1] for line in log.splitlines() if "#critical]" in line or "#error]" in line]


@pytest.mark.parametrize("listen,line", [
    ("ssl:0:privateKey=/nonexistent.pem",
     "regcache: --listen: cannot use 'ssl:0:privateKey=/nonexistent.pem': "
     "cannot read /nonexistent.pem: No such file or directory"),
    ("tcp:notaport", "regcache: --listen: cannot use 'tcp:notaport': 'notaport' is not a number"),
    ("tcp:0:colour=blue", "regcache: --listen: cannot use 'tcp:0:colour=blue': unknown parameter 'colour'"),
])
def test_bad_endpoint_blames_listen(tmp_path, listen, line):
    """A bad --listen is reported against --listen, in words, never against --storage."""
    status, stderr, log = run_to_exit(tmp_path, "--listen", listen)
    assert status != 0
    assert stderr[-1:] == [line]
    assert "Traceback" not in log


def test_port_out_of_range_blames_listen(tmp_path):
    """A port past 65535 is refused by the system when listening, and said so in words."""
    listen = "tcp:99999:interface=127.0.0.1"
    status, _, log = run_to_exit(tmp_path, "--listen", listen)
    assert status != 0
    assert failures(log) == [f"regcache: --listen: cannot listen on {listen!r}: the port must be 0-65535"]
    assert "Traceback" not in log


def test_unusable_storage_blames_storage(tmp_path):
    """A storage path that cannot be a directory is reported against --storage, with the path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = Regcache(str(blocker / "store"), "")
    done = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "regcache", "--storage", str(blocker / "store"), "--listen", "tcp:0"],
        env=r.env, capture_output=True, text=True, timeout=EXIT_BOUND,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1:] == [f"regcache: --storage: cannot use {blocker / 'store'}: Not a directory"]


def test_serving_line_comes_once_listening(regcache):
    """The "serving" line is logged once the port listens, and names the address it listens on."""
    r = regcache()
    serving = [line for line in r.log().splitlines() if "regcache serving" in line]
    assert len(serving) == 1
    assert f"127.0.0.1:{r.port}" in serving[0]


def test_upstream_with_its_api_path(regcache, hub, images):
    """An upstream given as http://host/v2/ is pulled through like its root, not at /v2/v2/."""
    r = regcache(upstream=hub.registry_url + "/v2/")
    status, headers, _ = r.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
    assert status == 200
    assert not [q for q in hub.request_log() if q["path"].startswith("/v2/v2/")]


def wait_ready(r, expected, bound=60.0):
    """The /readyz status once it is ``expected``, or the last one seen after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while True:
        status = r.get("/readyz", timeout=10)[0]
        if status == expected or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def test_readyz_follows_a_read_only_store(tmp_path, hub):
    """
    /readyz says 503 once the store's filesystem turns read-only, and 200
    again once it is writable; /healthz stays 200 throughout, and cached
    content is still served.
    """
    with small_filesystem("64m") as root:
        r = Regcache(root + "/store", hub.registry_url)
        # An open log would keep the filesystem from turning read-only.
        r.log_path = str(tmp_path / "regcache.log")
        r.stderr_path = str(tmp_path / "regcache.stderr")
        with r:
            assert r.get("/readyz")[0] == 200
            assert r.get("/v2/library/small/manifests/1", headers={"Accept": ALL})[0] == 200
            subprocess.run(["mount", "-o", "remount,ro", root], check=True)
            try:
                assert wait_ready(r, 503) == 503
                assert r.get("/healthz")[0] == 200
                status, _, body = r.get("/readyz")
                assert b"store" in body
            finally:
                subprocess.run(["mount", "-o", "remount,rw", root], check=True)
            assert wait_ready(r, 200) == 200

