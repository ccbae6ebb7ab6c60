# test-case-name: tests.integration.test_shared_proc
"""
The shared level with real processes: SeaweedFS (weed mini) as the bucket,
several regcache replicas in front of the fake Docker Hub, skopeo as the
client.  What one replica fetched, the others serve from the bucket without
asking upstream; with the bucket gone, each replica serves what it holds and
fetches the rest itself.
"""

import hashlib
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.integration.clients import dir_digests, expected_files, skopeo_pull
from tests.integration.procs import REPO, scrape, value, wait_for
from tests.integration.seaweed import ACCESS_KEY, SECRET_KEY

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


def _shared(proc, kind):
    """How many ``kind`` objects ``proc`` put in the bucket, whether it or another replica was first."""
    samples = scrape(proc.url)
    return sum(value(samples, "regcache_shared_uploads_total", kind=kind, result=r) for r in ("uploaded", "present"))


def _cached_by(proc, image, tmp_path):
    """
    Pull ``image`` through ``proc`` by tag and wait until all it fetched is
    in the bucket: blobs, manifest, its links and the tag.
    """
    r = skopeo_pull(f"{proc.host}/{image.name}", str(tmp_path / "first"))
    assert r.returncode == 0, r.stderr
    blobs = len(image.blobs())
    wait_for(lambda: _shared(proc, "blob") >= blobs and _shared(proc, "manifest") >= 1
             and _shared(proc, "link") >= blobs + 1 and _shared(proc, "tag") >= 1,
             what="the image's blobs, manifest, links and tag to reach the bucket")


def test_a_replica_that_never_saw_an_image_serves_it_with_upstream_stopped(replicas, hub, images, tmp_path):
    """
    With upstream down, B pulls by digest an image only A fetched: manifest,
    links and blobs all come from the bucket, upstream is asked nothing, and
    B's copy is byte-identical.
    """
    a, b = replicas(2)
    image = images[IMAGE]
    _cached_by(a, image, tmp_path)
    log = hub.request_log()
    hub.down()
    try:
        ref = f"{b.host}/{image.repo}@{image.digest}"
        r = skopeo_pull(ref, str(tmp_path / "b"))
        assert r.returncode == 0, r.stderr
    finally:
        hub.up()
    assert dir_digests(str(tmp_path / "b")) == expected_files(image)
    assert hub.request_log() == log
    samples = scrape(b.url)
    assert value(samples, "regcache_shared_lookups_total", kind="manifest", result="hit") == 1
    assert value(samples, "regcache_shared_lookups_total", kind="link", result="hit") >= 1
    assert _upstream_requests(samples) == 0


def test_a_tag_fresh_in_the_bucket_costs_no_upstream_request(replicas, hub, images, tmp_path):
    """
    B pulls by tag an image A pulled moments ago: the tag A checked is fresh
    in the bucket, so B asks upstream nothing at all, not even a HEAD.
    """
    a, b = replicas(2)
    image = images[IMAGE]
    _cached_by(a, image, tmp_path)
    log = hub.request_log()
    r = skopeo_pull(f"{b.host}/{image.name}", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "b")) == expected_files(image)
    assert hub.request_log() == log
    samples = scrape(b.url)
    assert value(samples, "regcache_shared_lookups_total", kind="tag", result="hit") == 1
    assert _upstream_requests(samples) == 0


def test_a_multi_platform_image_by_tag_with_upstream_stopped(replicas, hub, images, tmp_path):
    """
    An index A pulled with every platform, pulled from B by its tag with
    upstream down: the tag (fresh in the bucket), the index, each child
    manifest and every blob come from the bucket, with zero upstream
    requests, and every blob is byte-identical.
    """
    a, b = replicas(2)
    image = images["library/multiarch:1"]
    r = skopeo_pull(f"{a.host}/{image.name}", str(tmp_path / "a"), extra=["--all"])
    assert r.returncode == 0, r.stderr
    blobs, manifests = len(image.blobs()), len(image.manifests())
    wait_for(lambda: _shared(a, "blob") >= blobs and _shared(a, "manifest") >= manifests
             and _shared(a, "tag") >= 1, what="the index, its children and their blobs to reach the bucket")
    log = hub.request_log()
    hub.down()
    try:
        r = skopeo_pull(f"{b.host}/{image.name}", str(tmp_path / "b"), extra=["--all"])
        assert r.returncode == 0, r.stderr
    finally:
        hub.up()
    got = dir_digests(str(tmp_path / "b"))
    assert {blob.hex: blob.hex for blob in image.blobs()}.items() <= got.items()
    assert got["manifest.json"] == image.digest.split(":")[1]
    assert hub.request_log() == log
    assert _upstream_requests(scrape(b.url)) == 0


def _upstream_requests(samples):
    """Every request a replica sent upstream, by its own count."""
    return sum(v for (name, _), v in samples.items() if name == "regcache_upstream_requests_total")


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


def _bucket_request(seaweed, method, name, data=b""):
    """One signed request to the bucket, as another writer than regcache: its status."""
    url = f"{seaweed.endpoint}/{seaweed.bucket}/{name}"
    request = AWSRequest(method=method, url=url, data=data,
                         headers={"x-amz-content-sha256": hashlib.sha256(data).hexdigest()})
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(request)
    sent = urllib.request.Request(url, data=data if method == "PUT" else None, method=method,
                                  headers=dict(request.headers.items()))
    try:
        with urllib.request.urlopen(sent, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _verify(seaweed, storage):
    env = dict(os.environ, PYTHONPATH=REPO, **seaweed.regcache_env())
    return subprocess.run([sys.executable, "-m", "regcache", "verify", "--storage", storage,
                           *seaweed.regcache_args()], capture_output=True, text=True, env=env, timeout=300)


def test_verify_checks_the_bucket_and_deletes_what_is_bad(replicas, seaweed, images, tmp_path):
    """
    ``regcache verify`` with the s3 backend hashes every blob and manifest in
    the bucket: a clean bucket passes; a blob overwritten with other bytes
    is reported, exit status 1, and deleted, so a replica can share it anew.
    """
    a, = replicas(1)
    image = images["library/small:1"]
    _cached_by(a, image, tmp_path)
    done = _verify(seaweed, a.storage)
    assert done.returncode == 0, done.stdout + done.stderr
    objects = len(image.blobs()) + 1
    assert f"bucket: checked {objects} objects" in done.stdout
    layer = image.layers[0]
    name = f"blobs/sha256/{layer.hex[:2]}/{layer.hex}"
    assert _bucket_request(seaweed, "PUT", name, b"not the layer") == 200
    done = _verify(seaweed, a.storage)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"bucket: corrupt: {name}" in done.stdout
    assert _bucket_request(seaweed, "HEAD", name) == 404


def test_verify_says_when_it_checks_only_the_local_level(regcache, images, tmp_path):
    """Without the s3 backend, verify says the bucket was not checked."""
    a = regcache()
    r = skopeo_pull(f"{a.host}/library/small:1", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "regcache", "verify", "--storage", a.storage],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checked the local level only" in done.stdout
