# test-case-name: tests.integration.test_shared_proc
"""
The shared level with real processes: SeaweedFS (weed mini) as the bucket,
several regcache replicas in front of the fake Docker Hub, skopeo as the
client.  What one replica fetched, the others serve from the bucket without
asking upstream; with the bucket gone, each replica serves what it holds and
fetches the rest itself.
"""

import pytest

from tests.integration.clients import dir_digests, expected_files, skopeo_pull
from tests.integration.procs import scrape, value, wait_for

IMAGE = "library/multi:1"


@pytest.fixture
def replicas(regcache, seaweed):
    """A factory: ``replicas(n)`` starts n regcache processes sharing the one bucket."""
    def start(n, *args):
        return [regcache(*seaweed.regcache_args(), *args, env=seaweed.regcache_env()) for _ in range(n)]
    return start


def _blob_gets(hub, image):
    gets = hub.stats()["cdn_blob_gets"]
    return {b.digest: gets.get(b.digest, 0) for b in image.blobs()}


def test_a_replica_serves_what_another_fetched_from_the_bucket(replicas, hub, images, tmp_path):
    """
    B's pull of an image A pulled gets every blob from the bucket: upstream
    sends each blob once in all, and B's copy is byte-identical.
    """
    a, b = replicas(2)
    image = images[IMAGE]
    r = skopeo_pull(f"{a.host}/{IMAGE}", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: value(scrape(a.url), "regcache_shared_uploads_total", kind="blob", result="uploaded")
             >= len(image.blobs()), what="A's blobs to reach the bucket")
    r = skopeo_pull(f"{b.host}/{IMAGE}", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "b")) == expected_files(image)
    assert set(_blob_gets(hub, image).values()) == {1}
    m = scrape(b.url)
    assert value(m, "regcache_shared_lookups_total", kind="blob", result="hit") == len(image.blobs())
    # B's bytes came from the bucket, and are not counted as upstream's.
    assert value(m, "regcache_shared_blob_bytes_total", source="bucket") == sum(b.size for b in image.blobs())
    def upstream_bytes(samples):
        return sum(v for k, v in samples.items() if k[0] == "regcache_upstream_blob_bytes_total")
    assert upstream_bytes(m) == 0
    assert upstream_bytes(scrape(a.url)) >= sum(b.size for b in image.blobs())


def test_without_the_bucket_each_replica_goes_on_alone(replicas, seaweed, hub, images, tmp_path):
    """
    With SeaweedFS killed, a replica still serves what it holds without
    upstream, and a pull of what nobody holds is fetched from upstream: no
    pull fails for the bucket.
    """
    a, b = replicas(2)
    held = images["library/small:1"]
    r = skopeo_pull(f"{a.host}/library/small:1", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    seaweed.kill()
    before = _blob_gets(hub, held)
    r = skopeo_pull(f"{a.host}/library/small:1", str(tmp_path / "a2"))
    assert r.returncode == 0, r.stderr
    assert _blob_gets(hub, held) == before
    image = images[IMAGE]
    r = skopeo_pull(f"{b.host}/{IMAGE}", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "b")) == expected_files(image)
    assert value(scrape(b.url), "regcache_shared_lookups_total", kind="blob", result="failed") >= 1
