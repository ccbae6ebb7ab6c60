# test-case-name: tests.integration.test_clientauth_proc
"""
Client authentication in a real regcache process, with real clients: skopeo
with --src-creds, containerd with an Authorization header in hosts.toml,
podman with --creds; clients without credentials from outside the trusted
networks (127.0.0.1 is not trusted here) get 401; in ``cached-only`` mode a
cached image pulls anonymously and an uncached one does not, with no
upstream request at all.  No password ever reaches the process's log.
"""

import base64
import concurrent.futures
import socket
import subprocess

import pytest

from tests.integration.clients import Containerd, Podman, dir_digests, expected_files, skopeo_pull
from tests.integration.procs import wait_for

USER, PASSWORD = "robot", "pull-Secret-42"
#: A network that is not loopback: every test client here is a stranger.
ELSEWHERE = "192.0.2.0/24"


@pytest.fixture
def htpasswd(tmp_path):
    """An htpasswd file made by the real htpasswd -B, with one user."""
    path = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-cbB", str(path), USER, PASSWORD], check=True, capture_output=True)
    return str(path)


def authed(regcache, htpasswd, *args):
    return regcache("--htpasswd", htpasswd, "--trusted-networks", ELSEWHERE, *args)


def upstream_requests(hub) -> int:
    return len(hub.request_log())


def assert_no_password(rc):
    log = rc.log()
    assert log, "the process logged nothing"
    assert PASSWORD not in log
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in log


def test_skopeo_with_credentials_pulls_and_without_is_refused(hub, regcache, htpasswd, images, tmp_path):
    """
    skopeo --src-creds pulls the exact bytes; without credentials, or with a
    wrong password, it is refused with 401 and the Basic challenge, and
    nothing is fetched upstream for it.
    """
    rc = authed(regcache, htpasswd)
    image = images["library/small:1"]
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "ok"), creds=f"{USER}:{PASSWORD}")
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "ok")) == expected_files(image)
    before = upstream_requests(hub)
    for creds in (None, f"{USER}:wrong"):
        r = skopeo_pull(f"{rc.host}/library/multi:1", str(tmp_path / "no"), creds=creds)
        assert r.returncode != 0
        assert "unauthorized" in r.stderr.lower() or "authentication required" in r.stderr.lower(), r.stderr
    status, headers, body = rc.get("/v2/")
    assert (status, headers["WWW-Authenticate"]) == (401, 'Basic realm="regcache"')
    assert b"UNAUTHORIZED" in body
    assert upstream_requests(hub) == before
    assert rc.get("/healthz")[0] == 200
    assert "Failed login for robot from 127.0.0.1" in rc.log()
    assert_no_password(rc)


def test_containerd_sends_the_hosts_toml_header(hub, regcache, htpasswd, images):
    """
    ctr pulls through regcache with `Authorization = "Basic …"` in the
    mirror's [host."…".header] table; without it the same pull fails.
    """
    rc = authed(regcache, htpasswd)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    ctd = Containerd().start()
    try:
        ctd.mirror("docker.io", rc.host)
        r = ctd.pull("docker.io/library/small:1")
        assert r.returncode != 0
        ctd.mirror("docker.io", rc.host, headers={"Authorization": f"Basic {token}"})
        r = ctd.pull("docker.io/library/small:1")
        assert r.returncode == 0, r.stderr + r.stdout
        assert "docker.io/library/small:1" in ctd.images()
    finally:
        ctd.stop()
    assert "/manifests/1?ns=docker.io 200" in rc.log()
    assert_no_password(rc)


def test_podman_logs_in_to_the_mirror_through_auth_json(hub, regcache, htpasswd, images, tmp_path):
    """
    podman's mirror credentials are the auth.json entry for the mirror's
    host (`podman login` writes it); --creds is for the image's own
    registry, so through a mirror it is refused, while pulling from
    regcache by its own name with --creds works.
    """
    rc = authed(regcache, htpasswd)
    podman = Podman(rc.host)
    authfile = str(tmp_path / "auth.json")
    try:
        r = podman.run("pull", "--creds", f"{USER}:{PASSWORD}", "docker.io/library/small:1")
        assert r.returncode != 0
        assert "unauthorized" in r.stderr, r.stderr
        r = podman.run("login", "--tls-verify=false", "--authfile", authfile, "-u", USER, "-p", PASSWORD, rc.host)
        assert r.returncode == 0, r.stderr
        r = podman.run("pull", "--authfile", authfile, "docker.io/library/small:1")
        assert r.returncode == 0, r.stderr
        assert podman.digest("docker.io/library/small:1") == images["library/small:1"].digest
        r = podman.run("pull", "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}", f"{rc.host}/library/multi:1")
        assert r.returncode == 0, r.stderr
    finally:
        podman.cleanup()
    assert_no_password(rc)


def test_a_trusted_network_needs_no_credentials(hub, regcache, htpasswd, images, tmp_path):
    """With 127.0.0.0/8 trusted, skopeo pulls without credentials."""
    rc = regcache("--htpasswd", htpasswd, "--trusted-networks", f"{ELSEWHERE},127.0.0.0/8")
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr


def test_cached_only_serves_the_cache_and_never_fetches_for_strangers(hub, regcache, htpasswd, images, tmp_path):
    """
    In cached-only mode an image a logged-in client pulled pulls
    anonymously, an uncached one is refused with 401, and neither makes
    regcache send a single request upstream.
    """
    rc = authed(regcache, htpasswd, "--anonymous", "cached-only")
    image = images["library/small:1"]
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "warm"), creds=f"{USER}:{PASSWORD}")
    assert r.returncode == 0, r.stderr
    before = upstream_requests(hub)
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "anon"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "anon")) == expected_files(image)
    r = skopeo_pull(f"{rc.host}/library/multi:1", str(tmp_path / "miss"))
    assert r.returncode != 0
    status, headers, _ = rc.get("/v2/library/multi/manifests/1")
    assert (status, headers["WWW-Authenticate"]) == (401, 'Basic realm="regcache"')
    assert upstream_requests(hub) == before
    assert_no_password(rc)


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_guesser_at_the_same_address_does_not_lock_out_a_logged_in_user(hub, regcache, htpasswd):
    """
    A password guesser sharing the user's address (a NAT, an ingress not
    configured as a proxy) is slowed down with 429, and its further guesses
    stay refused; the user, whose login passed moments ago, keeps pulling.
    """
    rc = authed(regcache, htpasswd)
    assert rc.get("/v2/", headers=basic(USER, PASSWORD))[0] == 200
    answers = [rc.get("/v2/", headers=basic(USER, f"guess{i}"))[0] for i in range(6)]
    assert answers[-1] == 429, answers
    assert rc.get("/v2/", headers=basic(USER, "guess-again"))[0] == 429
    status, _, body = rc.get("/v2/", headers=basic(USER, PASSWORD))
    assert status == 200, body


def test_a_guesser_cannot_dodge_the_slow_down_by_rotating_ipv6_addresses(hub, regcache, htpasswd):
    """
    Behind a trusted proxy, a guesser whose every attempt comes from
    another address of one IPv6 /64 (a single host or LAN has 2**64 of
    them) is slowed down as one client; another /64 is not.
    """
    rc = authed(regcache, htpasswd, "--trusted-proxies", "127.0.0.1")
    answers = [rc.get("/v2/", headers={**basic(USER, "guess"), "X-Forwarded-For": f"2001:db8:1:2::{i + 1:x}"})[0]
               for i in range(6)]
    assert answers == [401] * 5 + [429], answers
    assert rc.get("/v2/", headers={**basic(USER, "guess"), "X-Forwarded-For": "2001:db8:1:3::1"})[0] == 401


def test_client_text_cannot_write_control_characters_into_the_log(hub, regcache, htpasswd):
    """
    What a client sends reaches the log with its control characters
    escaped: the user name of a failed login, and a request's path and
    ``ns`` (where Twisted already refuses C0 controls, but not DEL or the
    C1 CSI); a terminal escape or a line break in them is text in the log,
    so it can neither recolour a terminal nor forge a line.
    """
    rc = authed(regcache, htpasswd)
    name = "evil\x1b[2J\r\n2026-12-01T00:00:00+0000 [regcache.access#info] GET /forged 200"
    assert rc.get("/v2/", headers=basic(name, "x"))[0] == 401
    with socket.create_connection(("127.0.0.1", rc.port), timeout=30) as s:
        s.sendall(b"GET /v2/a\x9b2J\x7f/manifests/1?ns=x\x9b31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 ")
        while s.recv(65536):
            pass
    log = wait_for(lambda: (lambda text: text if "/v2/a" in text else None)(rc.log()))
    assert "Failed login for evil\\x1b[2J\\x0d\\x0a2026-12-01" in log, log[-2000:]
    assert "GET /v2/a\\x9b2J\\x7f/manifests/1?ns=x\\x9b31m " in log, log[-2000:]
    assert not any(c in log for c in "\x1b\r\x7f\x9b")


def test_a_burst_of_guesses_gets_no_more_checks_than_the_throttle_allows(hub, regcache, htpasswd):
    """
    Twenty wrong passwords sent from one address at once: however they
    interleave, at most five are checked (401), as if sent one by one,
    and the rest are 429.
    """
    rc = authed(regcache, htpasswd)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: rc.get("/v2/", headers=basic(USER, f"burst{i}"))[0], range(20)))
    assert set(answers) <= {401, 429}, answers
    assert 1 <= answers.count(401) <= 5, answers
