# test-case-name: tests.integration.test_health_proc
"""
A sick upstream with real processes: twistd regcache in front of the fake
Hub switched between its modes (hung, refusing, 429-pull-limit, 429-abuse,
normal).  Cached pulls are answered from cache with the stale Warning, and
once the circuit is open without the Hub seeing them; uncached pulls fail
with words a person can read; and when the Hub is back, uncached pulls work
again.  Nothing here measures time: what the Hub saw is counted, and waits
for a state are bounded loops of attempts (bench/ has the figures).
"""

import json
import re

import pytest

from tests.integration.clients import dir_digests, skopeo_pull
from tests.integration.procs import wait_for

SMALL = "/v2/library/small/manifests/1"
MULTI = "/v2/library/multi/manifests/1"
ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                    "application/vnd.docker.distribution.manifest.list.v2+json, "
                    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"}


def message(body: bytes) -> str:
    return json.loads(body)["errors"][0]["message"]


def circuit(rc) -> float:
    """The regcache_upstream_circuit_state of the one upstream (0 up, 1 failing, 2 open)."""
    _, _, body = rc.get("/metrics")
    m = re.search(rb"^regcache_upstream_circuit_state\{[^}]*\} ([0-9.]+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def cached(hub, regcache):
    """regcache (tag window 0: every pull is a revalidation) with library/small:1 pulled; its manifest."""
    rc = regcache("--tag-ttl", "0", "--header-timeout", "2s")
    status, _, body = rc.get(SMALL, headers=ACCEPT)
    assert status == 200
    return rc, body


def heads(hub) -> int:
    return hub.stats()["manifest_heads_total"]


def test_hung_hub_cached_pulls_from_cache_uncached_in_words(hub, regcache):
    """
    The Hub hangs: a cached tag is answered from cache with the Warning
    (the Hub never answers, so nothing waited for it); once the check has
    timed out the circuit is open and ten more cached pulls reach the Hub
    as one probe at most; an uncached pull fails naming the header timeout.
    """
    rc, body = cached(hub, regcache)
    hub.mode("hung")
    status, headers, again = rc.get(SMALL, headers=ACCEPT)
    assert (status, again) == (200, body) and "Stale" in headers["Warning"]
    wait_for(lambda: circuit(rc) == 2)
    seen = heads(hub)
    for _ in range(10):
        status, headers, again = rc.get(SMALL, headers=ACCEPT)
        assert (status, again) == (200, body) and "Stale" in headers["Warning"]
    assert heads(hub) - seen <= 1
    status, _, error = rc.get(MULTI, headers=ACCEPT)
    assert status == 503
    assert "library/multi:1 is not cached and upstream 127.0.0.1:" in message(error)
    assert "did not answer within 2 s (--header-timeout)" in message(error)


def test_refusing_hub_cached_pulls_from_cache_uncached_in_words(hub, regcache):
    """The Hub's ports are closed: cached pulls are served stale, an uncached one says the connection was refused."""
    rc, body = cached(hub, regcache)
    hub.mode("refusing")
    status, headers, again = rc.get(SMALL, headers=ACCEPT)
    assert (status, again) == (200, body) and "Stale" in headers["Warning"]
    status, _, error = rc.get(MULTI, headers=ACCEPT)
    assert status == 503
    assert "refused the connection" in message(error)
    assert "Failure" not in message(error) and "<" not in message(error)


@pytest.mark.parametrize("mode", ["hung", "refusing"])
def test_uncached_pulls_work_again_when_the_hub_is_back(hub, regcache, mode):
    """After an outage that opened the circuit, the Hub recovers and an uncached pull succeeds within a few probes."""
    rc, _ = cached(hub, regcache)
    hub.mode(mode)
    rc.get(SMALL, headers=ACCEPT)
    wait_for(lambda: circuit(rc) == 2)
    hub.mode("normal")
    wait_for(lambda: rc.get(MULTI, headers=ACCEPT)[0] == 200)
    assert circuit(rc) == 0


def test_pull_limit_pauses_only_uncached_manifests(hub, regcache, images):
    """
    No pulls left on the account: cached tags still revalidate (HEADs are
    free: fresh, no Warning), an uncached manifest fails with the limit in
    words, and blobs still download.
    """
    rc, body = cached(hub, regcache)
    hub.mode("429-pull-limit")
    status, headers, again = rc.get(SMALL, headers=ACCEPT)
    assert (status, again, headers["Warning"], headers["X-Cache"]) == (200, body, None, "revalidated")
    status, headers, error = rc.get(MULTI, headers=ACCEPT)
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 6 * 3600
    assert "your pull limit of 200 per 6 h is used up" in message(error)
    assert "left in the window" in message(error)
    gets = hub.stats()["manifest_gets_total"]
    assert rc.get(MULTI, headers=ACCEPT)[0] == 429
    assert hub.stats()["manifest_gets_total"] == gets
    blob = images["library/multi:1"].layers[0]
    status, _, data = rc.get(f"/v2/library/multi/blobs/{blob.digest}")
    assert status == 200 and len(data) == blob.size


def test_abuse_limit_serves_the_cache(hub, regcache):
    """A bare 429 on everything: cached pulls are served stale; an uncached one is a 429 saying what happened."""
    rc, body = cached(hub, regcache)
    hub.mode("429-abuse")
    status, headers, again = rc.get(SMALL, headers=ACCEPT)
    assert (status, again) == (200, body) and "Stale" in headers["Warning"]
    status, _, error = rc.get(MULTI, headers=ACCEPT)
    assert status == 429
    assert "rate limiting every request" in message(error)


def test_skopeo_pulls_a_cached_image_while_the_hub_hangs(hub, regcache, tmp_path):
    """skopeo pulls an image through regcache, the Hub hangs, and a second skopeo pull of it succeeds, same bytes."""
    rc = regcache("--tag-ttl", "0", "--header-timeout", "2s")
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    hub.mode("hung")
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "b")) == dir_digests(str(tmp_path / "a"))
