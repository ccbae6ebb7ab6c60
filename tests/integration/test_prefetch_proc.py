# test-case-name: tests.integration.test_prefetch_proc
"""
``regcache prefetch`` as a CI job runs it: a subprocess warming a real
regcache in front of the fake Hub, its output a pipe (plain lines), then
real pulls of what it warmed with every upstream host down.
"""

import os
import subprocess
import sys

from tests.integration.clients import dir_digests, expected_files, skopeo_pull
from tests.integration.procs import REPO


def prefetch(rc, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("REGCACHE_MIRROR", None)
    return subprocess.run([sys.executable, "-m", "regcache", "prefetch", "--mirror", rc.url, *args],
                          capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def summary(result):
    return result.stdout.strip().splitlines()[-1]


def test_one_platform_is_warmed_and_pulls_with_upstream_down(hub, regcache, images, tmp_path):
    """
    Prefetching a multi-arch image for linux/arm64 fetches the index, the
    arm64 manifest and its blobs once each, nothing of amd64; skopeo then
    pulls the arm64 image with every upstream host down.
    """
    rc = regcache()
    index = images["library/multiarch:1"]
    arm64, amd64 = index.child("arm64"), index.child("amd64")
    r = prefetch(rc, "--platform", "linux/arm64", "multiarch:1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary(r).startswith("prefetch: 1 images; manifests: 2 fetched, 0 cached, 0 failed; "
                                 f"blobs: {len(arm64.blobs())} fetched, 0 cached, 0 failed;"), r.stdout
    assert f"manifest {arm64.digest} fetched (miss)" in r.stdout
    stats = hub.stats()
    assert {b.digest: stats["cdn_blob_gets"].get(b.digest) for b in arm64.blobs()} == \
        {b.digest: 1 for b in arm64.blobs()}
    assert not any(b.digest in stats["cdn_blob_gets"] for b in amd64.blobs())
    assert stats["manifest_gets_by_ref"].get(f"library/multiarch@{amd64.digest}", 0) == 0
    hub.down("all")
    dest = str(tmp_path / "arm64")
    r = skopeo_pull(f"{rc.host}/library/multiarch:1", dest, extra=["--override-arch", "arm64", "--override-os", "linux"])
    assert r.returncode == 0, r.stderr
    assert dir_digests(dest) == expected_files(arm64)


def test_second_run_finds_everything_cached(hub, regcache, images, tmp_path):
    """
    Prefetch is idempotent: a second run of the same list (a tag, a
    multi-arch tag with every platform, a digest) reports every manifest
    and blob cached, exits 0, and costs upstream no manifest or blob GET.
    """
    rc = regcache()
    multi = images["library/multi:1"]
    listing = tmp_path / "images.txt"
    listing.write_text(f"# base images\nlibrary/small:1\n\nmultiarch:1\ndocker.io/library/multi@{multi.digest}\n")
    first = prefetch(rc, "--from-file", str(listing))
    assert first.returncode == 0, first.stdout + first.stderr
    assert ", 0 cached, 0 failed; blobs: " in summary(first), first.stdout
    before = hub.stats()
    second = prefetch(rc, "--from-file", str(listing))
    assert second.returncode == 0, second.stdout + second.stderr
    blobs = {b.digest for name in ("library/small:1", "library/multiarch:1", "library/multi:1")
             for i in [images[name]] for m in (i.children or [i]) for b in m.blobs()}
    assert summary(second).startswith(
        f"prefetch: 3 images; manifests: 0 fetched, 5 cached, 0 failed; blobs: 0 fetched, {len(blobs)} cached, "
        "0 failed; 0 B fetched,"), second.stdout
    after = hub.stats()
    assert after["cdn_blob_gets_total"] == before["cdn_blob_gets_total"]
    assert after["manifest_gets_total"] == before["manifest_gets_total"]


def test_a_failing_image_fails_the_run_and_the_others_are_done(hub, regcache, images):
    """
    An image upstream does not have, and one that is no reference at all,
    each get a FAILED line and exit status 1; the images around them are
    still warmed in full.
    """
    rc = regcache()
    r = prefetch(rc, "library/small:1", "library/nosuch:1", "Not/A/Reference", "library/multi:1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "library/nosuch:1: FAILED: manifest 1: 404 manifest unknown: library/nosuch:1\n" in r.stdout
    assert "Not/A/Reference: FAILED: Not/A/Reference: invalid repository name" in r.stdout
    assert summary(r).startswith("prefetch: 4 images (2 failed); manifests: 2 fetched, 0 cached, 1 failed;")
    stats = hub.stats()
    for name in ("library/small:1", "library/multi:1"):
        assert "\n" + name + ": done\n" in "\n" + r.stdout
        for b in images[name].blobs():
            assert stats["cdn_blob_gets"].get(b.digest) == 1, (name, b.digest)
            status, headers, _ = rc.get(f"/v2/{images[name].repo}/blobs/{b.digest}", method="HEAD")
            assert (status, headers["X-Cache"]) == (200, "hit")
