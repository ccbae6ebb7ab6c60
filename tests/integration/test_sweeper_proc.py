# test-case-name: tests.integration.test_sweeper_proc
"""
The bucket's size limit with real processes: two regcache replicas with
--s3-max-size on one SeaweedFS bucket; one of them holds the sweeper lease
and evicts the least recently used blobs until the bucket fits, and what
was used last stays shared.
"""

import pytest

from tests.integration.clients import skopeo_pull
from tests.integration.procs import scrape, value, wait_for

LIMIT = 5 * 1024 * 1024


@pytest.fixture
def limited(regcache, seaweed):
    """``limited(n)``: n replicas sharing the bucket, each with the 5 MiB limit and a sweep every second."""
    def start(n):
        return [regcache(*seaweed.regcache_args(), "--s3-max-size", str(LIMIT), "--s3-sweep-interval", "1s",
                         env=seaweed.regcache_env()) for _ in range(n)]
    return start


def _total(replicas, name, **labels):
    return sum(value(scrape(r.url), name, **labels) for r in replicas)


def test_the_sweeper_evicts_the_least_recently_used_until_the_bucket_fits(limited, regcache, seaweed, images,
                                                                          tmp_path):
    """
    An image of 15 MiB, then a small one, go into a bucket limited to
    5 MiB: the replica holding the sweeper lease evicts the first image's
    blobs (the least recently used) until the bucket fits, the other
    replica is refused the lease, and the small image's layer is still in
    the bucket for a third replica.
    """
    a, b = limited(2)
    multi, small = images["library/multi:1"], images["library/small:1"]
    r = skopeo_pull(f"{a.host}/library/multi:1", str(tmp_path / "multi"))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _total([a], "regcache_shared_uploads_total", kind="blob", result="uploaded")
             >= len(multi.blobs()), what="the first image's blobs to reach the bucket")
    r = skopeo_pull(f"{b.host}/library/small:1", str(tmp_path / "small"))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _total([b], "regcache_shared_uploads_total", kind="blob", result="uploaded")
             >= len(small.blobs()), what="the small image's blobs to reach the bucket")

    def fits():
        held = [value(scrape(r.url), "regcache_shared_bucket_bytes") for r in (a, b)]
        return _total([a, b], "regcache_shared_evicted_total", kind="blob") >= 1 and 0 < max(held) <= LIMIT

    wait_for(fits, what="the sweeper to bring the bucket under its limit")
    swept = [value(scrape(r.url), "regcache_shared_sweeps_total", result="swept") for r in (a, b)]
    refused = [value(scrape(r.url), "regcache_shared_sweeps_total", result="not_holder") for r in (a, b)]
    assert sorted(s > 0 for s in swept) == [False, True], swept
    assert refused[swept.index(0)] > 0

    c = regcache(*seaweed.regcache_args(), env=seaweed.regcache_env())
    layer = max(small.blobs(), key=lambda blob: blob.size)
    status, headers, _ = c.get(f"/v2/library/small/blobs/{layer.digest}", method="HEAD")
    assert (status, headers["X-Cache"]) == (200, "shared")
    gone = []
    for blob in multi.blobs():
        status, headers, _ = c.get(f"/v2/library/multi/blobs/{blob.digest}", method="HEAD")
        assert status == 200
        gone.append(headers["X-Cache"] == "miss")
    assert any(gone)
