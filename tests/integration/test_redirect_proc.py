# test-case-name: tests.integration.test_redirect_proc
"""
redirect: true with real clients: skopeo and containerd pull through a
regcache that requires a login, follow its 307s to presigned URLs of the
bucket, and send the bucket no Authorization header.  A recording relay in
front of SeaweedFS's S3 port is regcache's endpoint, so the presigned URLs
point at it and it sees every request the clients send there.  The clients
reach regcache as ``localhost``, the bucket is ``127.0.0.1``: a host that is
not the mirror's nor a subdomain of it, as the docs require.
"""

import base64
import hashlib
import subprocess
from urllib.parse import urlsplit

import pytest

from tests.integration.clients import Containerd, dir_digests, expected_files, skopeo_pull
from tests.integration.procs import scrape, value, wait_for
from tests.integration.recording_proxy import Recorder

USER, PASSWORD = "puller", "redirect-Secret-7"
#: Not loopback: the test's clients must log in.
ELSEWHERE = "192.0.2.0/24"
IMAGE = "library/multi:1"


@pytest.fixture
def relay(seaweed, tmp_path):
    """The recording relay in front of the store's S3 port."""
    with Recorder(seaweed.s3_port, str(tmp_path)) as recorder:
        yield recorder


@pytest.fixture
def redirecting(regcache, seaweed, relay, tmp_path):
    """A regcache with --s3-redirect, its endpoint the relay, requiring a login (htpasswd)."""
    htpasswd = str(tmp_path / "htpasswd")
    subprocess.run(["htpasswd", "-cbB", htpasswd, USER, PASSWORD], check=True, capture_output=True)
    args = seaweed.regcache_args()
    args[args.index("--s3-endpoint") + 1] = relay.url
    return regcache(*args, "--s3-redirect", "--htpasswd", htpasswd, "--trusted-networks", ELSEWHERE,
                    env=seaweed.regcache_env())


def _warm(rc, images, tmp_path):
    """A first pull, from upstream (neither level holds it: served directly), its blobs then in the bucket."""
    image = images[IMAGE]
    r = skopeo_pull(f"localhost:{rc.port}/{IMAGE}", str(tmp_path / "warm"), creds=f"{USER}:{PASSWORD}")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: value(scrape(rc.url), "regcache_shared_uploads_total", kind="blob", result="uploaded")
             >= len(image.blobs()), what="the blobs to reach the bucket")
    return image


def _presigned(relay, since: int):
    """The requests sent to the bucket with presigned URLs (a query signature) after the first ``since``."""
    return [r for r in relay.requests()[since:] if "X-Amz-Signature=" in r["target"]]


def _assert_fetched_from_the_bucket(relay, since, image, rc):
    """Every blob came from the bucket through a presigned URL, with no Authorization header sent there."""
    fetched = _presigned(relay, since)
    names = {urlsplit(r["target"]).path.rsplit("/", 1)[1] for r in fetched}
    assert names == {b.digest.split(":")[1] for b in image.blobs()}
    assert all(r["method"] == "GET" and r["status"] in (200, 206) for r in fetched), fetched
    assert [r for r in fetched if "authorization" in r["headers"]] == []
    assert value(scrape(rc.url), "regcache_cache_lookups_total", kind="blob", result="redirect") >= len(names)


def test_skopeo_follows_the_redirect_and_sends_the_bucket_no_credentials(redirecting, relay, hub, images, tmp_path):
    """
    skopeo, logged in to regcache, follows each blob's 307 to the bucket
    and gets the exact bytes there without sending its credentials;
    upstream sent each blob once in all.
    """
    image = _warm(redirecting, images, tmp_path)
    since = len(relay.requests())
    r = skopeo_pull(f"localhost:{redirecting.port}/{IMAGE}", str(tmp_path / "again"), creds=f"{USER}:{PASSWORD}")
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "again")) == expected_files(image)
    _assert_fetched_from_the_bucket(relay, since, image, redirecting)
    gets = hub.stats()["cdn_blob_gets"]
    assert {gets.get(b.digest, 0) for b in image.blobs()} == {1}


def test_the_relay_sees_credentials_a_client_does_send(redirecting, relay, images, tmp_path):
    """
    The check above can fail: curl --location-trusted takes its
    Authorization header along the redirect, and the relay records it
    (SeaweedFS ignores it; S3 refuses such a request, and either store has
    then seen the client's password).
    """
    image = _warm(redirecting, images, tmp_path)
    since = len(relay.requests())
    layer = image.blobs()[0].digest
    url = f"http://localhost:{redirecting.port}/v2/library/multi/blobs/{layer}"
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "--location-trusted", "-u", f"{USER}:{PASSWORD}", url],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    fetched = _presigned(relay, since)
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert [f["headers"].get("authorization") for f in fetched] == [expected]


def test_containerd_follows_the_redirect_and_sends_the_bucket_no_credentials(redirecting, relay, images, tmp_path):
    """
    ctr, sending its hosts.toml Authorization header to regcache, follows
    each blob's 307 to the bucket without it, and its content store holds
    the exact bytes.
    """
    image = _warm(redirecting, images, tmp_path)
    since = len(relay.requests())
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    ctd = Containerd().start()
    try:
        ctd.mirror("docker.io", f"localhost:{redirecting.port}", headers={"Authorization": f"Basic {token}"})
        r = ctd.pull(f"docker.io/{IMAGE}")
        assert r.returncode == 0, r.stderr + r.stdout
        for b in image.blobs():
            got = subprocess.run(["ctr", "--address", ctd.sock, "-n", "test", "content", "get", b.digest],
                                 capture_output=True, timeout=60)
            assert got.returncode == 0, got.stderr
            assert "sha256:" + hashlib.sha256(got.stdout).hexdigest() == b.digest
    finally:
        ctd.stop()
    _assert_fetched_from_the_bucket(relay, since, image, redirecting)
