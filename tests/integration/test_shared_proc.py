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


def _bucket_put(seaweed, key, body):
    """Write ``body`` at ``key`` in the bucket behind regcache's back, as a buggy or hostile writer would."""
    import urllib.request

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from tests.integration.seaweed import ACCESS_KEY, SECRET_KEY

    url = f"{seaweed.endpoint}/{seaweed.bucket}/{key}"
    request = AWSRequest(method="PUT", url=url, data=body)
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(request)
    r = urllib.request.Request(url, data=body, method="PUT", headers=dict(request.headers))
    with urllib.request.urlopen(r, timeout=30) as answer:
        assert answer.status == 200


def test_a_wrong_copy_in_the_bucket_does_not_fail_every_pull(replicas, seaweed, hub, images, tmp_path):
    """
    The bucket holds wrong bytes (of the right length) under a blob's
    name: SeaweedFS stores a PUT whatever its payload hash, and a bucket
    is shared with whatever else writes to it.  A pull through a replica
    may fail once on it (its bytes were streamed before they could be
    checked), but not every pull, for ever, on every replica: the next
    one gets the blob from upstream.
    """
    (a,) = replicas(1)
    image = images["library/small:1"]
    victim = max(image.blobs(), key=lambda b: b.size)
    _bucket_put(seaweed, f"blobs/sha256/{victim.hex[:2]}/{victim.hex}", b"\0" * victim.size)
    results = [skopeo_pull(f"{a.host}/library/small:1", str(tmp_path / f"p{i}")) for i in range(3)]
    assert results[-1].returncode == 0, "every pull failed on the bucket's wrong copy:\n" + results[-1].stderr
    assert dir_digests(str(tmp_path / "p2")) == expected_files(image)
