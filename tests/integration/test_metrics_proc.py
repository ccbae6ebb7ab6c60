# test-case-name: tests.integration.test_metrics_proc
"""
/metrics and the pull accounting of a real regcache process in front of the
fake Docker Hub: a scripted set of pulls (anonymous, cold, joined, warm,
stale during a 429) moves every counter by exactly what it should, the
remaining-quota gauges are what the Hub last said, the accounting survives
a restart, and --metrics-listen moves /metrics to a port of its own.
"""

import base64
import json
import re
import threading

import bcrypt

from tests.integration.conftest import USERS
from tests.integration.procs import Regcache, scrape, value, wait_for

ACCEPT = {"Accept": ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])}


#: The password of the one client account, ``builder``.
CLIENT_PASSWORD = "builder-secret"


def start(tmp_path, hub, name="store"):
    (tmp_path / "password").write_text(USERS["ci"] + "\n")
    hashed = bcrypt.hashpw(CLIENT_PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    (tmp_path / "htpasswd").write_text(f"builder:{hashed}\n")
    config = tmp_path / "regcache.yaml"
    config.write_text(f"""\
auth:
  htpasswd: {tmp_path / 'htpasswd'}
  anonymous: allow
policy:
  hub:
    default: allow
    rules:
      - deny: evil/**
upstreams:
  - name: hub
    docker_hub: true
    hosts: [docker.io, registry-1.docker.io, index.docker.io]
    urls:
      - url: {hub.registry_url}
        username: ci
        password_file: {tmp_path / 'password'}
  - name: anon
    alias: anon
    docker_hub: true
    hosts: [anon.example]
    urls: [{hub.registry_url}]
    tag_ttl: 0s
metrics:
  ratelimit_probe: 1h
""")
    return Regcache(str(tmp_path / name), None, ["--config", str(config)]).start()


def test_scripted_pulls_move_each_counter_exactly(tmp_path, hub, images):
    """
    Every counter moves by exactly what the scripted pulls cost, the
    counted pulls are the Hub's own count of manifest GETs, and the
    remaining-quota gauge is the Hub's last ratelimit-remaining.
    """
    hub.ratelimit(100)
    small, multi = images["library/small:1"], images["library/multi:1"]
    config, layer = small.config, small.layers[0]
    member = hub.registry_host
    rc = start(tmp_path, hub)
    try:
        # The probe runs at start-up, for both Docker Hub members.
        wait_for(what="the rate-limit probes", predicate=lambda: all(
            value(scrape(rc.url), "regcache_upstream_requests_total", upstream=u, member=member, kind="probe",
                  status="200") == 1 for u in ("hub", "anon")))
        before = hub.stats()
        assert before["manifest_gets_total"] == 0
        assert before["manifest_heads"] == {"ratelimitpreview/test": 2}

        # Anonymous: a cold tag, through the upstream without credentials.
        status, headers, _ = rc.get("/v2/anon/library/multi/manifests/1", headers=ACCEPT)
        assert (status, headers["X-Cache"]) == (200, "miss")
        # Cold, with the account.
        status, headers, body = rc.get("/v2/library/small/manifests/1", headers=ACCEPT)
        assert (status, headers["X-Cache"], body) == (200, "miss", small.manifest)
        status, _, body = rc.get(f"/v2/library/small/blobs/{config.digest}")
        assert (status, len(body)) == (200, config.size)
        # Joined: a second client asks while the first one's download drips in.
        hub.fault("drip", scope="blobs", path=layer.hex, chunk=64 * 1024, interval=0.1, times=1)
        answers = {}

        def pull(who):
            answers[who] = rc.get(f"/v2/library/small/blobs/{layer.digest}")

        first = threading.Thread(target=pull, args=("first",))
        first.start()
        wait_for(what="the download to start", predicate=lambda: value(scrape(rc.url), "regcache_inflight_downloads") == 1)
        second = threading.Thread(target=pull, args=("second",))
        second.start()
        first.join(120)
        second.join(120)
        assert sorted(a[1]["X-Cache"] for a in answers.values()) == ["join", "miss"]
        assert all((a[0], len(a[2])) == (200, layer.size) for a in answers.values())
        # Clients have every byte once it is verified; it is a hit once it is stored.
        wait_for(what="the download to land", predicate=lambda: value(scrape(rc.url), "regcache_blob_fills_total",
                                                      result="landed") == 2)
        # Warm: nothing goes upstream.
        status, headers, _ = rc.get("/v2/library/small/manifests/1", headers=ACCEPT)
        assert (status, headers["X-Cache"]) == (200, "hit")
        status, headers, _ = rc.get(f"/v2/library/small/blobs/{layer.digest}")
        assert (status, headers["X-Cache"]) == (200, "hit")
        # Stale during a 429: the anonymous tag (revalidated every time) is served from cache.
        hub.fault("status", scope="manifests", status=429, times=1)
        status, headers, body = rc.get("/v2/anon/library/multi/manifests/1", headers=ACCEPT)
        assert (status, headers["X-Cache"], body) == (200, "stale", multi.manifest)
        assert "Stale" in headers["Warning"]
        # Denied by the pull policy, and a client whose login is refused:
        # neither reaches upstream.
        seen = len(hub.request_log())
        status, _, body = rc.get("/v2/evil/app/manifests/1", headers=ACCEPT)
        assert status == 403 and b"DENIED" in body
        wrong = base64.b64encode(b"builder:wrong").decode()
        status, headers, _ = rc.get("/v2/library/small/manifests/1", headers={**ACCEPT, "Authorization": f"Basic {wrong}"})
        assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="regcache"'
        assert len(hub.request_log()) == seen

        # A response is counted when regcache has finished it, which can be
        # just after the client has read its last byte.
        wait_for(what="every blob answer to be counted", predicate=lambda: value(
            scrape(rc.url), "regcache_requests_total", route="blobs", method="GET", status="200") == 4)
        m = scrape(rc.url)
        stats = hub.stats()
    finally:
        rc.stop()

    # Counted pulls: one per upstream, as many as the Hub saw.
    assert stats["manifest_gets_total"] == 2
    for upstream in ("hub", "anon"):
        assert value(m, "regcache_upstream_pulls_total", upstream=upstream, member=member) == 1

    def upstream(name, kind, status):
        return value(m, "regcache_upstream_requests_total", upstream=name, member=member, kind=kind, status=status)

    expected = {
        ("hub", "probe", "401"): 1, ("hub", "probe", "200"): 1, ("hub", "token", "200"): 2,
        ("hub", "manifest_head", "200"): 1, ("hub", "manifest_get", "200"): 1,
        ("hub", "blob", "307"): 2, ("hub", "blob", "200"): 2,
        ("anon", "probe", "401"): 1, ("anon", "probe", "200"): 1, ("anon", "token", "200"): 2,
        ("anon", "manifest_head", "200"): 1, ("anon", "manifest_head", "429"): 1,
        ("anon", "manifest_get", "200"): 1,
    }
    sent = {(dict(k)["upstream"], dict(k)["kind"], dict(k)["status"]): v
            for (name, k), v in m.items() if name == "regcache_upstream_requests_total"}
    assert sent == expected
    assert all(upstream(*k) == v for k, v in expected.items())

    lookups = {(dict(k)["kind"], dict(k)["result"]): v
               for (name, k), v in m.items() if name == "regcache_cache_lookups_total"}
    assert lookups == {("tag", "miss"): 2, ("tag", "hit"): 1, ("tag", "stale"): 1,
                       ("manifest", "miss"): 2, ("manifest", "hit"): 2,
                       ("blob", "miss"): 2, ("blob", "join"): 1, ("blob", "hit"): 1}
    cache_bytes = {(dict(k)["kind"], dict(k)["result"]): v
                   for (name, k), v in m.items() if name == "regcache_cache_bytes_total"}
    assert cache_bytes == {
        ("manifest", "miss"): multi.size + small.size, ("manifest", "hit"): small.size,
        ("manifest", "stale"): multi.size,
        ("blob", "miss"): config.size + layer.size, ("blob", "join"): layer.size, ("blob", "hit"): layer.size,
    }
    assert value(m, "regcache_upstream_blob_bytes_total", upstream="hub") == config.size + layer.size
    assert value(m, "regcache_requests_total", route="manifests", method="GET", status="200") == 4
    assert value(m, "regcache_requests_total", route="manifests", method="GET", status="403") == 1
    assert value(m, "regcache_requests_total", route="manifests", method="GET", status="401") == 1
    assert value(m, "regcache_policy_denials_total", upstream="hub", rule="0") == 1
    assert value(m, "regcache_client_auth_failures_total", reason="bad_password") == 1
    assert value(m, "regcache_requests_total", route="blobs", method="GET", status="200") == 4
    assert value(m, "regcache_response_duration_seconds_count", kind="manifest") == 6  # the 403 and 401 too
    assert value(m, "regcache_response_first_byte_seconds_count", kind="blob") == 4
    assert value(m, "regcache_inflight_downloads") == 0
    assert value(m, "regcache_inflight_clients") == 0

    # The remaining quota is what the Hub last said: to the account, after
    # its pull (the anonymous pull came first, and saw one more).
    remaining = stats["ratelimit"]["remaining"]
    assert remaining == 98
    assert value(m, "dockerhub_limit_remaining_requests_total", upstream="hub", member=member,
                 credential="ci") == remaining
    assert value(m, "dockerhub_limit_remaining_requests_total", upstream="anon", member=member,
                 credential="anonymous") == remaining + 1
    assert value(m, "dockerhub_limit_max_requests_total", upstream="hub", member=member, credential="ci") == 100
    assert value(m, "regcache_upstream_ratelimit_remaining", upstream="hub", member=member) == remaining

    # The accounting was written at shutdown, and survives a restart.
    def accounts():
        with open(tmp_path / "store" / "accounting.json") as f:
            return {(a["upstream"], a["credential"]): [sum(col) for col in zip(*a["hours"].values())]
                    for a in json.load(f)["accounts"]}

    assert accounts() == {("hub", "ci"): [1, 1, config.size + layer.size], ("anon", "anonymous"): [1, 1, 0]}
    rc = start(tmp_path, hub)
    rc.get("/v2/library/small/manifests/1", headers=ACCEPT)
    rc.stop()
    assert accounts() == {("hub", "ci"): [1, 1, config.size + layer.size], ("anon", "anonymous"): [1, 1, 0]}


def test_metrics_listen_moves_metrics_to_its_own_port(regcache):
    """With --metrics-listen, /metrics answers there and is a 404 on the registry port."""
    # Port 0: the process picks one no other can take first, and says which.
    rc = regcache("--metrics-listen", "tcp:0:interface=127.0.0.1")
    port = int(re.search(r"regcache serving tcp:0:interface=127\.0\.0\.1 on 127\.0\.0\.1:(\d+)", rc.log()).group(1))
    status, _, _ = rc.get("/v2/")
    assert status == 200
    assert rc.get("/metrics")[0] == 404
    m = scrape(f"http://127.0.0.1:{port}")
    assert value(m, "regcache_requests_total", route="v2", method="GET", status="200") == 1
    assert value(m, "regcache_requests_total", route="metrics", method="GET", status="404") == 1
