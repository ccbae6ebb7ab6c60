# test-case-name: tests.integration.test_procs
"""
The helper that starts regcache for the real-process tests: a process that
writes a lot to stderr is not stopped by it, a start that fails says why,
a port taken between its pick and the bind is picked again, its log is
read whole, rotated files included, and the fake Hub the tests share is
as it started for each.
"""

import http.server
import json
import os
import socket
import threading
import urllib.request

import pytest

from tests.fakes import registry
from tests.integration import procs
from tests.integration.conftest import fresh
from tests.integration.procs import Regcache, closed_port
from tests.processes import free_port

#: Linux's default pipe buffer: what a pipe nobody reads holds before the
#: writer blocks.
PIPE_BUFFER = 64 * 1024


def test_a_chatty_stderr_does_not_stop_the_process(tmp_path):
    """
    A regcache that writes far more to stderr than a pipe holds (every
    import it makes, with PYTHONVERBOSE) still starts and serves: its stderr
    goes to a file, which nobody has to read for the process to go on.
    """
    rc = Regcache(str(tmp_path / "store"), f"http://127.0.0.1:{closed_port()}", env={"PYTHONVERBOSE": "1"})
    try:
        rc.start()
        assert rc.get("/healthz")[0] == 200
        assert os.path.getsize(rc.stderr_path) > PIPE_BUFFER
    finally:
        rc.stop()


def test_a_failed_start_says_why(tmp_path):
    """
    A regcache that cannot start (a bad option) makes ``start`` raise with
    the end of what it wrote to stderr, the one line naming the option, and
    leaves no process behind.
    """
    rc = Regcache(str(tmp_path / "store"), f"http://127.0.0.1:{closed_port()}", ["--tag-ttl", "soon"])
    with pytest.raises(RuntimeError, match=r"regcache: --tag-ttl: not a duration: 'soon'"):
        rc.start()
    assert rc.proc.poll() is not None


def test_the_log_includes_its_rotated_files(tmp_path):
    """
    ``log()`` is every line twistd wrote, oldest first, across the files
    it rotated to (``.2`` older than ``.1``, older than the current one),
    so a count over a long run's log misses nothing.
    """
    rc = Regcache(str(tmp_path / "store"), None)
    for suffix, line in ((".2", "first\n"), (".1", "second\n"), ("", "third\n"), (".tmp", "not a log\n")):
        with open(rc.log_path + suffix, "w") as f:
            f.write(line)
    assert rc.log() == "first\nsecond\nthird\n"


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Whatever took the port first: it answers every GET with a 200, /readyz included."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_port_taken_before_the_bind_is_picked_again(tmp_path, monkeypatch):
    """
    The port the helper picked is taken (here by a server that answers
    /readyz itself) before regcache binds it: the start is not fooled by
    the other server's answer, and regcache ends up serving on a port of
    its own, which the helper's URL names.
    """
    impostor = http.server.HTTPServer(("127.0.0.1", 0), _Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    picks = iter([impostor.server_address[1]])
    upstream = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(procs, "free_port", lambda: next(picks, None) or free_port())
    rc = Regcache(str(tmp_path / "store"), upstream)
    try:
        assert rc.port == impostor.server_address[1]
        rc.start()
        assert rc.port != impostor.server_address[1]
        status, headers, _ = rc.get("/v2/")
        assert (status, headers["Docker-Distribution-API-Version"]) == (200, "registry/2.0")
    finally:
        rc.stop()
        impostor.shutdown()


def test_a_real_registry_whose_port_is_taken_picks_another(tmp_path, monkeypatch):
    """
    docker-registry finding its picked port taken (it exits: address
    already in use) is started again on another, and answers there.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1]])
        monkeypatch.setattr(registry, "free_port", lambda: next(picks, None) or free_port())
        with registry.RealRegistry(tmp_path / "registry") as real:
            assert real.port != taken.getsockname()[1]
            with urllib.request.urlopen(real.url + "/v2/", timeout=10) as r:
                assert r.status == 200


def test_the_shared_hub_is_fresh_for_each_test(hub_process, images):
    """
    Whatever a test left the shared fake Hub in (a mode, a fault, a host
    down, a moved tag, referrers off, a spent rate limit, counters), the
    next test finds it as it started.
    """
    hub = fresh(hub_process)
    started = hub.stats()
    with urllib.request.urlopen(f"{hub.auth_url}/token?service=registry.docker.io"
                                "&scope=repository:library/small:pull", timeout=10) as r:
        token = json.loads(r.read())["token"]
    hub.mode("429-abuse")
    hub.fault("reset", scope="blobs", times=3)
    hub.move_tag("library/small", "1", image="library/small:1#2")
    hub.referrers(False)
    hub.ratelimit(5, 0)
    hub.down("cdn")
    fresh(hub)

    def manifest_digest():
        request = urllib.request.Request(f"{hub.registry_url}/v2/library/small/manifests/1", method="HEAD",
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Accept": images["library/small:1"].media_type})
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.headers["Docker-Content-Digest"]

    assert manifest_digest() == images["library/small:1"].digest
    referrers = urllib.request.Request(
        f"{hub.registry_url}/v2/library/small/referrers/{images['library/small:1'].digest}",
        headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(referrers, timeout=10) as r:
        assert r.status == 200
    with socket.create_connection((hub.cdn_url.split("//")[1].split(":")[0], int(hub.cdn_url.rsplit(":", 1)[1])),
                                  timeout=10):
        pass
    stats = hub.stats()
    assert (stats["faults"], stats["ratelimit"]) == ([], started["ratelimit"])
    assert (stats["manifest_heads_total"], stats["referrers_gets"], stats["token_requests"]) == (
        1, {f"library/small@{images['library/small:1'].digest}": 1}, 0)
