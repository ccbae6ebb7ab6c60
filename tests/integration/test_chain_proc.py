# test-case-name: tests.integration.test_chain_proc
"""
An upstream chain in a real regcache process: two fake registries as the
URLs of one upstream, tried in order, the first (like mirror.gcr.io) lacking
the image and needing no credentials, the second (the fake Hub) serving it
with the team's account.
"""

import concurrent.futures

import pytest

from tests.fakes.serve import FakeHubProcess
from tests.integration.clients import dir_digests, expected_files, skopeo_pull
from tests.integration.conftest import USERS
from tests.integration.procs import Regcache


def chain(tmp_path, *members, hub):
    """
    regcache (not yet started) with one upstream whose URLs are
    ``members`` in order, then the fake Hub with the team's account.
    """
    (tmp_path / "password").write_text(USERS["ci"] + "\n")
    urls = "".join(f"      - {m.registry_url}\n" for m in members)
    config = tmp_path / "regcache.yaml"
    config.write_text(f"""\
upstreams:
  - name: dockerhub
    hosts: [docker.io]
    urls:
{urls}      - url: {hub.registry_url}
        username: ci
        password_file: {tmp_path / 'password'}
""")
    return Regcache(str(tmp_path / "store"), None, ["--config", str(config)])


@pytest.fixture
def first(ghcr):
    """A registry that has other images than Docker Hub's, and no accounts."""
    return ghcr


@pytest.fixture
def chained(tmp_path, hub, first):
    with chain(tmp_path, first, hub=hub) as rc:
        yield rc


def asked(fake, fragment):
    return [e for e in fake.request_log() if fragment in e["path"] and e["host"] == "registry"]


def test_first_member_lacks_the_image_second_serves_it(chained, hub, first, images, tmp_path):
    """
    Four concurrent skopeo pulls of an image only the second member has all
    get its exact bytes; the first member is asked once per tag check and
    once per digest (not once per client); the second serves each manifest
    and blob once.
    """
    image = images["library/small:1"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda i: skopeo_pull(f"{chained.host}/library/small:1", str(tmp_path / f"p{i}")),
                             range(4)))
    for i, r in enumerate(runs):
        assert r.returncode == 0, r.stderr
        assert dir_digests(str(tmp_path / f"p{i}")) == expected_files(image)

    # One tag check for four clients: the first member's challenge, then
    # its insufficient_scope once regcache holds a token.  After that the
    # challenge is known, so each digest costs it one request.
    tag_checks = [e for e in asked(first, "/library/small/manifests/1") if e["method"] == "HEAD"]
    assert len(tag_checks) == 2, tag_checks
    for blob in image.blobs():
        assert len(asked(first, f"/blobs/{blob.digest}")) == 1, blob.digest
        assert hub.stats()["cdn_blob_gets"].get(blob.digest, 0) == 1, blob.digest
    assert all(e["status"] in (401, 404) for e in asked(first, "/library/small/"))
    assert hub.stats()["manifest_gets_by_ref"].get(f"library/small@{image.digest}", 0) == 1


@pytest.fixture
def broken(ghcr_dir):
    """A third registry, made to fail by each test."""
    with FakeHubProcess(ghcr_dir, catalog="ghcr", no_rate_limit=True) as b:
        yield b


@pytest.mark.parametrize("status", [503, 429, 403])
def test_a_failing_member_falls_through(status, tmp_path, hub, first, broken, images):
    """
    A chain of three, the first failing (5xx, rate limited, refusing), the
    second lacking the image: pulls still get the third's exact bytes, and
    the failing member was asked.
    """
    broken.fault("status", scope="all", status=status)
    with chain(tmp_path, broken, first, hub=hub) as rc:
        r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "p")) == expected_files(images["library/small:1"])
    assert asked(broken, "/library/small/")
    assert asked(first, "/library/small/")
