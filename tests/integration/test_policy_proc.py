# test-case-name: tests.integration.test_policy_proc
"""
The pull policy in a real regcache process in front of the fake Hub: a
denied pull of every kind is a 403 DENIED with nothing asked of the Hub or
its token server, what was cached under a name is refused once a SIGHUP
reload denies it, a bad file on SIGHUP keeps the old rules, and skopeo
shows the DENIED message to its user.
"""

import json
import os
import re
import signal

import pytest

from tests.integration.clients import dir_digests, expected_files, skopeo_pull
from tests.integration.conftest import USERS
from tests.integration.procs import Regcache, wait_for

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}

ALLOW_SMALL = """\
    default: deny
    rules:
      - allow: library/small
      - allow: [bitnami/*, grafana/*]
"""

DENY_SMALL = """\
    default: allow
    rules:
      - allow: library/alpine
      - deny: library/*
"""


def write_config(path, hub, password_file, policy):
    path.write_text(f"""\
upstreams:
  - name: dockerhub
    urls:
      - url: {hub.registry_url}
        username: ci
        password_file: {password_file}
policy:
  dockerhub:
{policy}""")


@pytest.fixture
def mirror(tmp_path, hub):
    """regcache with a config file whose policy allows only library/small (and two organisations)."""
    (tmp_path / "password").write_text(USERS["ci"] + "\n")
    config = tmp_path / "regcache.yaml"
    write_config(config, hub, tmp_path / "password", ALLOW_SMALL)
    rc = Regcache(str(tmp_path / "store"), None, ["--config", str(config)])
    rc.config = config
    rc.policy = lambda text: write_config(config, hub, tmp_path / "password", text)
    rc.start()
    yield rc
    rc.stop()


def upstream_counts(hub):
    """Every counter the fake Hub and its token server keep, less the rate-limit state they report."""
    stats = hub.stats()
    return {k: v for k, v in stats.items() if k not in ("ratelimit", "faults")}


def reloads(rc, result):
    status, _, body = rc.get("/metrics")
    assert status == 200
    m = re.search(rf'regcache_reloads_total{{result="{result}",what="policy"}} ([0-9.]+)', body.decode())
    return float(m.group(1)) if m else 0.0


def sighup(rc, result="ok"):
    """Send SIGHUP and wait (bounded) until the reload it starts is counted with ``result``."""
    before = reloads(rc, result)
    os.kill(rc.proc.pid, signal.SIGHUP)
    wait_for(lambda: reloads(rc, result) != before, 30, f"a {result} reload to be counted after SIGHUP")


def paths(image):
    """Manifest by tag and by digest, a blob, the tag list and referrers of ``image``'s repository."""
    repo = image.repo
    return [f"/v2/{repo}/manifests/{image.tag}", f"/v2/{repo}/manifests/{image.digest}",
            f"/v2/{repo}/blobs/{image.layers[0].digest}", f"/v2/{repo}/tags/list",
            f"/v2/{repo}/referrers/{image.digest}"]


def denied(rc, path, method="GET"):
    status, _, body = rc.get(path, method=method, headers=ACCEPT)
    if method == "HEAD":
        return status == 403
    return status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"


def test_denied_pulls_are_403_with_zero_upstream_requests(mirror, hub, images):
    """Every kind of request for a denied name is 403 DENIED, and neither the Hub nor its token server hears of it."""
    before = upstream_counts(hub)
    image = images["library/multi:1"] if "library/multi:1" in images else next(
        i for n, i in images.items() if not n.startswith("library/small"))
    for path in paths(image):
        for method in ("GET", "HEAD"):
            assert denied(mirror, path, method), (method, path)
    status, _, body = mirror.get("/v2/library/nginx/manifests/latest", headers=ACCEPT)
    assert status == 403 and b"no rule allows it" in body, body
    assert upstream_counts(hub) == before
    assert 'regcache_policy_denials_total{rule="default",upstream="dockerhub"} 11.0' in mirror.get("/metrics")[2].decode()
    assert "Denied manifests of library/nginx:latest" in mirror.log()


def test_nothing_cached_is_served_once_a_reload_denies_the_name(mirror, hub, images):
    """
    library/small pulled while allowed, then denied by a SIGHUP reload:
    its manifests, blobs, tag list and referrers are refused from the cache
    too, with no upstream request; a second reload allows them again.
    """
    small = images["library/small:1"]
    for path in paths(small):
        status, _, body = mirror.get(path, headers=ACCEPT)
        assert status == 200, (path, status, body[:300])
    before = upstream_counts(hub)
    mirror.policy(DENY_SMALL)
    sighup(mirror)
    for path in paths(small):
        status, _, body = mirror.get(path, headers=ACCEPT)
        assert status == 403 and b"rule 1 ('library/*')" in body, (path, status, body[:300])
    assert upstream_counts(hub) == before
    mirror.policy(ALLOW_SMALL)
    sighup(mirror)
    status, headers, _ = mirror.get(paths(small)[2])
    assert (status, headers["X-Cache"]) == (200, "hit")


def test_a_bad_file_on_sighup_keeps_the_old_rules(mirror, hub, images):
    """A SIGHUP with a broken rule counts a failed reload, logs why in one line, and the old rules stay."""
    small = images["library/small:1"]
    mirror.policy(DENY_SMALL + "      - allow: library/[bad]\n")
    sighup(mirror, "failed")
    assert mirror.get(paths(small)[0], headers=ACCEPT)[0] == 200
    assert denied(mirror, "/v2/library/nginx/manifests/latest")
    assert "policy.dockerhub.rules[2].allow: 'library/[bad]' has characters" in mirror.log()
    mirror.config.write_text("upstreams: [\n")
    sighup(mirror, "failed")
    assert mirror.get(paths(small)[0], headers=ACCEPT)[0] == 200
    assert mirror.proc.poll() is None


def test_an_upstream_change_on_sighup_says_it_takes_a_restart(mirror, hub, tmp_path):
    """The rules of a file that also changes an upstream are applied; the log says the upstreams need a restart."""
    text = mirror.config.read_text().replace("username: ci", "username: other")
    mirror.config.write_text(text.replace("      - allow: library/small\n", ""))
    sighup(mirror)
    assert denied(mirror, "/v2/library/small/manifests/1")
    assert "also changes upstreams: that takes a restart" in mirror.log()


def test_skopeo_shows_the_denial_and_pulls_what_is_allowed(mirror, hub, images, tmp_path):
    """skopeo's pull of a denied image fails with regcache's DENIED message in its stderr; an allowed one works."""
    before = upstream_counts(hub)
    r = skopeo_pull(f"{mirror.host}/library/multi:1", str(tmp_path / "denied"))
    assert r.returncode != 0
    assert "denied" in r.stderr.lower() and "no rule allows it" in r.stderr, r.stderr
    assert upstream_counts(hub) == before
    r = skopeo_pull(f"{mirror.host}/library/small:1", str(tmp_path / "small"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "small")) == expected_files(images["library/small:1"])
