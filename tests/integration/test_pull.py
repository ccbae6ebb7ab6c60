# test-case-name: tests.integration.test_pull
"""
Real clients pull through a real regcache process in front of a fake Docker
Hub (token realm, CDN redirects) or a real docker-registry, and get exactly
the upstream bytes, with each blob fetched upstream once.
"""

import concurrent.futures
import hashlib
import socket

import pytest

from tests.fakes.registry import RealRegistry
from tests.integration.clients import Containerd, dir_digests, expected_files, skopeo_pull
from tests.integration.procs import wait_for


@pytest.mark.parametrize("name", ["library/small:1", "library/multi:1", "library/large:1", "library/ociindex:1"])
def test_skopeo_pulls_exact_bytes(hub, regcache, images, tmp_path, name):
    """
    skopeo pulls each kind of image through regcache; every file equals the
    upstream's bytes, and a second pull is served with no new upstream GET.
    """
    rc = regcache()
    image = images[name]
    if image.children:
        image = image.child("amd64")
    r = skopeo_pull(f"{rc.host}/{name}", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "a")) == expected_files(image)
    before = hub.stats()
    r = skopeo_pull(f"{rc.host}/{name}", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    after = hub.stats()
    assert after["cdn_blob_gets_total"] == before["cdn_blob_gets_total"]
    assert after["manifest_gets_total"] == before["manifest_gets_total"]


def test_multiarch_index_is_kept_verbatim(hub, regcache, images, tmp_path):
    """
    A manifest list is stored and served byte for byte (never converted),
    and skopeo --all copies it with both children.
    """
    rc = regcache()
    image = images["library/multiarch:1"]
    status, headers, body = rc.get(
        "/v2/library/multiarch/manifests/1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.list.v2+json"},
    )
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == image.digest.split(":")[1]
    assert headers["Content-Type"] == image.media_type
    assert headers["Docker-Content-Digest"] == image.digest
    r = skopeo_pull(f"{rc.host}/library/multiarch:1", str(tmp_path / "all"), extra=["--all"])
    assert r.returncode == 0, r.stderr


def test_eight_concurrent_cold_pulls_fetch_each_blob_once(hub, regcache, images, tmp_path):
    """
    Eight clients pulling the large image cold at once cause exactly one
    upstream GET per blob, and all eight get identical, correct copies.
    """
    rc = regcache()
    image = images["library/large:1"]

    def pull(i):
        return skopeo_pull(f"{rc.host}/library/large:1", str(tmp_path / f"p{i}"))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(pull, range(8)))
    for r in results:
        assert r.returncode == 0, r.stderr
    for i in range(8):
        assert dir_digests(str(tmp_path / f"p{i}")) == expected_files(image)
    stats = hub.stats()
    for blob in image.blobs():
        assert stats["cdn_blob_gets"].get(blob.digest) == 1, (blob.digest, stats["cdn_blob_gets"])
    assert stats["manifest_gets_by_ref"].get(f"library/large@{image.digest}", 0) == 1


def test_digest_pull_works_with_upstream_down(hub, regcache, images, tmp_path):
    """
    Content pulled by digest once is served again while every upstream host
    refuses connections.
    """
    rc = regcache()
    image = images["library/multi:1"]
    ref = f"{rc.host}/library/multi@{image.digest}"
    assert skopeo_pull(ref, str(tmp_path / "a")).returncode == 0
    hub.down("all")
    r = skopeo_pull(ref, str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "b")) == expected_files(image)


def test_client_killed_mid_blob_still_lands(hub, regcache, images):
    """
    A client that hangs up part-way through a cold blob does not stop the
    download: the blob lands, verified, and is then served with no second
    upstream GET.
    """
    rc = regcache()
    blob = images["library/large:1"].layers[0]
    hub.fault("drip", scope="blobs", chunk=4 * 1024 * 1024, interval=0.05)
    s = socket.create_connection(("127.0.0.1", rc.port))
    s.sendall(f"GET /v2/library/large/blobs/{blob.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = 0
    while got < 10 * 1024 * 1024:
        got += len(s.recv(1 << 20))
    s.close()
    hub.clear_faults()
    wait_for(lambda: "Blob fill landed: " + blob.digest in rc.log(), what="the fill to land")
    status, headers, body = rc.get(f"/v2/library/large/blobs/{blob.digest}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == blob.digest.split(":")[1]
    assert hub.stats()["cdn_blob_gets"][blob.digest] == 1


def test_real_docker_registry_upstream(tmp_path, images, regcache):
    """
    A real distribution registry as the upstream (no auth, no CDN): skopeo
    gets the exact bytes through regcache.
    """
    image = images["library/multi:1"]
    with RealRegistry(tmp_path / "registry") as registry:
        registry.push_image(image)
        rc = regcache(upstream=registry.url, credentials=False)
        r = skopeo_pull(f"{rc.host}/library/multi:1", str(tmp_path / "out"))
        assert r.returncode == 0, r.stderr
        assert dir_digests(str(tmp_path / "out")) == expected_files(image)


def test_containerd_pulls_with_ns(hub, regcache, images):
    """
    containerd's ctr resolves and fetches through regcache with ?ns=docker.io
    on every request, and unpacks the image.
    """
    rc = regcache()
    ctd = Containerd().start()
    try:
        ctd.mirror("docker.io", rc.host)
        r = ctd.pull("docker.io/library/multi:1")
        assert r.returncode == 0, r.stderr + r.stdout
        assert "docker.io/library/multi:1" in ctd.images()
        assert "/manifests/1?ns=docker.io 200" in rc.log()
    finally:
        ctd.stop()
    log = [e for e in hub.request_log() if "/blobs/" in e["path"] and e["host"] == "cdn"]
    assert len(log) == len(images["library/multi:1"].blobs())


def test_podman_pulls_through_the_mirror(hub, regcache, images):
    """
    podman, whose docker.io location is a closed port, pulls through the
    regcache mirror entry and records the upstream manifest digest.
    """
    from tests.integration.clients import Podman

    rc = regcache()
    podman = Podman(rc.host)
    try:
        r = podman.pull("docker.io/library/small:1")
        assert r.returncode == 0, r.stderr
        assert podman.digest("docker.io/library/small:1") == images["library/small:1"].digest
    finally:
        podman.cleanup()
    assert "GET /v2/library/small/manifests/" in rc.log()


def test_dockerd_pulls_through_registry_mirrors(hub, regcache, images):
    """
    dockerd, sealed in a loopback-only network namespace with regcache as
    its registry-mirror, pulls an image (HEAD by tag with separate Accept
    lines, then GETs by digest) and records the upstream digest.
    """
    from tests.integration.dockerd import SealedDockerd, available

    reason = available()
    if reason:
        pytest.skip(reason)
    rc = regcache()
    docker = SealedDockerd(rc.port).start()
    try:
        r = docker.docker("pull", "library/multi:1")
        assert r.returncode == 0, r.stderr + r.stdout
        digests = docker.docker("image", "inspect", "--format", "{{json .RepoDigests}}", "library/multi:1")
        assert images["library/multi:1"].digest in digests.stdout
    finally:
        docker.stop()
    assert "HEAD /v2/library/multi/manifests/1 200" in rc.log()


def test_basic_auth_upstream(tmp_path, images, regcache):
    """
    A real docker-registry that wants HTTP Basic (htpasswd) rather than a
    bearer token: regcache answers its Basic challenge with the configured
    credentials, and skopeo gets the exact bytes.  Without credentials the
    pull is refused with an OCI error, never a bare 401.
    """
    import subprocess

    image = images["library/small:1"]
    root = tmp_path / "registry"
    with RealRegistry(root) as open_registry:
        open_registry.push_image(image)
        port = open_registry.port
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), "ci", "s3cret-token"], check=True, capture_output=True)
    with RealRegistry(root, port=port, htpasswd=htpasswd) as registry:
        rc = regcache(upstream=registry.url)
        r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "out"))
        assert r.returncode == 0, r.stderr
        assert dir_digests(str(tmp_path / "out")) == expected_files(image)
        anonymous = regcache(upstream=registry.url, credentials=False)
        status, headers, body = anonymous.get("/v2/library/small/manifests/1")
        assert status == 503 and b"errors" in body
