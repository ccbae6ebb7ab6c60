# test-case-name: tests.integration.test_routing_proc
"""
Several registries behind one regcache process: a fake Docker Hub and a
ghcr-like fake (other images, its own token realm) configured as two
upstreams in a config file, pulled by real clients by ``?ns=`` (containerd)
and by path prefix (skopeo, podman); a registry neither answers for is
refused with nothing fetched, and the client's fallback is what fails.
"""

import shutil

import pytest

from tests.fakes.images import ghcr_images
from tests.integration.clients import Containerd, dir_digests, expected_files, skopeo_pull
from tests.integration.conftest import USERS
from tests.integration.procs import Regcache


@pytest.fixture
def app(ghcr_dir):
    """The ghcr-like fake's one image (the same files it serves)."""
    return ghcr_images(ghcr_dir)["owner/app:v1"]


@pytest.fixture
def mirror(tmp_path, hub, ghcr):
    """regcache with a config file: the fake Hub as Docker Hub (the default), the fake ghcr as ghcr.io."""
    (tmp_path / "password").write_text(USERS["ci"] + "\n")
    config = tmp_path / "regcache.yaml"
    config.write_text(f"""\
upstreams:
  - name: dockerhub
    alias: dockerhub
    hosts: [docker.io, registry-1.docker.io, index.docker.io]
    urls:
      - url: {hub.registry_url}
        username: ci
        password_file: {tmp_path / 'password'}
  - name: ghcr
    alias: ghcr
    hosts: [ghcr.io]
    urls: [{ghcr.registry_url}]
""")
    rc = Regcache(str(tmp_path / "store"), None, ["--config", str(config)])
    rc.start()
    yield rc
    rc.stop()


def upstream_requests(*fakes) -> int:
    return sum(len(f.request_log()) for f in fakes)


def test_skopeo_pulls_by_host_and_alias_prefix(mirror, hub, ghcr, app, images, tmp_path):
    """
    skopeo, which cannot send ns, pulls the ghcr-like image by
    /v2/ghcr.io/... and by /v2/ghcr/..., and Docker Hub's by no prefix:
    each with its own registry's bytes.
    """
    for ref in (f"{mirror.host}/ghcr.io/owner/app:v1", f"{mirror.host}/ghcr/owner/app:v1"):
        r = skopeo_pull(ref, str(tmp_path / "app"))
        assert r.returncode == 0, r.stderr
        assert dir_digests(str(tmp_path / "app")) == expected_files(app)
    r = skopeo_pull(f"{mirror.host}/library/small:1", str(tmp_path / "small"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "small")) == expected_files(images["library/small:1"])
    assert any("/owner/app/manifests/v1" in e["path"] for e in ghcr.request_log())
    assert not any("owner/app" in e["path"] for e in hub.request_log())


def test_unknown_registry_is_refused_with_nothing_fetched(mirror, hub, ghcr):
    """ns=quay.io or a quay.io prefix is a 404 NAME_UNKNOWN naming quay.io, and neither upstream hears of it."""
    before = upstream_requests(hub, ghcr)
    for path in ("/v2/library/small/manifests/1?ns=quay.io", "/v2/quay.io/library/small/manifests/1"):
        status, _, body = mirror.get(path, headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        assert status == 404 and b"NAME_UNKNOWN" in body and b"quay.io" in body, (status, body)
    assert upstream_requests(hub, ghcr) == before


@pytest.fixture
def containerd():
    if shutil.which("ctr") is None or shutil.which("containerd") is None:
        pytest.skip("containerd is not installed")
    c = Containerd().start()
    yield c
    c.stop()


def test_containerd_pulls_from_each_registry_by_ns(mirror, hub, ghcr, app, images, containerd):
    """
    ctr with hosts.toml directories for docker.io and ghcr.io both
    pointing at regcache (fallback: a closed port) pulls one image from
    each registry, with ns naming the registry on its requests; a quay.io
    directory pointing at regcache gets the 404, falls back to the closed
    port and fails, and no upstream is asked anything for it.
    """
    for registry in ("docker.io", "ghcr.io", "quay.io"):
        containerd.mirror(registry, mirror.host)
    r = containerd.pull("docker.io/library/small:1")
    assert r.returncode == 0, r.stderr
    r = containerd.pull("ghcr.io/owner/app:v1")
    assert r.returncode == 0, r.stderr
    log = mirror.log()
    assert "/v2/library/small/manifests/1?ns=docker.io" in log
    assert f"/v2/owner/app/blobs/{app.layers[0].digest}?ns=ghcr.io" in log
    assert any(e["path"].startswith("/v2/owner/app/") for e in ghcr.request_log())
    assert not any("owner/app" in e["path"] for e in hub.request_log())

    before = upstream_requests(hub, ghcr)
    r = containerd.pull("quay.io/library/small:1")
    assert r.returncode != 0
    assert "/v2/library/small/manifests/1?ns=quay.io 404" in mirror.log()
    assert upstream_requests(hub, ghcr) == before
    assert "quay.io/library/small:1" not in containerd.images()


def test_podman_pulls_through_a_path_prefix_mirror(mirror, app):
    """podman with a registries.conf mirror location carrying a path (regcache/ghcr) pulls the ghcr-like image."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    from tests.integration.clients import Podman

    podman = Podman(f"{mirror.host}/ghcr", prefix="ghcr.io")
    try:
        r = podman.pull("ghcr.io/owner/app:v1")
        assert r.returncode == 0, r.stderr
        assert podman.digest("ghcr.io/owner/app:v1") == app.digest
    finally:
        podman.cleanup()
    assert "GET /v2/ghcr/owner/app/manifests/" in mirror.log()
