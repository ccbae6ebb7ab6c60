# test-case-name: tests.integration.test_links_proc
"""
The cross-repository leak, with real processes: twistd regcache holding the
team's Hub credentials, the fake Hub with a private repository, skopeo.
Content regcache cached for the private repository is not served under a
public name; upstream is asked (a HEAD in the public repository's scope,
never a GET) and says no.  Links survive a restart and ``regcache verify``.
"""

import json
import subprocess
import sys

from tests.fakes.images import private
from tests.integration.clients import dir_digests, expected_files, skopeo_pull
from tests.integration.procs import REPO

ALL = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
])


def answered(hub, method, path):
    """The requests the fake Hub answered for ``path`` (the 401s of the token dance left out)."""
    return [e for e in hub.request_log() if e["method"] == method and e["path"] == path and e["status"] != 401]


def error_code(body: bytes) -> str:
    return json.loads(body)["errors"][0]["code"]


def test_private_image_is_not_served_under_a_public_name(hub, regcache, images_dir, tmp_path):
    """
    skopeo pulls ci/private:1 through regcache (which holds the account's
    credentials); its blobs and manifest asked for by digest as
    library/small are then 404s, after one HEAD each in library/small's
    scope and no GET there; nothing was downloaded again.
    """
    image = private(images_dir)
    rc = regcache()
    dest = tmp_path / "private"
    r = skopeo_pull(f"{rc.host}/ci/private:1", str(dest))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(dest)) == expected_files(image)
    before = hub.stats()

    for b in image.blobs():
        path = f"/v2/library/small/blobs/{b.digest}"
        status, _, body = rc.get(path)
        assert (status, error_code(body)) == (404, "BLOB_UNKNOWN"), body
        assert len(answered(hub, "HEAD", path)) == 1
        assert answered(hub, "GET", path) == []
    path = f"/v2/library/small/manifests/{image.digest}"
    status, _, body = rc.get(path, headers={"Accept": ALL})
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN"), body
    assert len(answered(hub, "HEAD", path)) == 1

    after = hub.stats()
    assert after["cdn_blob_gets"] == before["cdn_blob_gets"]
    assert after["manifest_gets"] == before["manifest_gets"]
    assert "library/small" not in after["manifest_gets"]


def test_links_survive_a_restart_and_verify(hub, regcache, tmp_path):
    """
    A blob upstream confirmed in a second repository is served there; after
    ``regcache verify`` and a restart on the same storage it still is, and
    so is the first repository's image, with no upstream request at all.
    """
    hub.move_tag("mirror/small", "1", image="library/small:1")
    storage = str(tmp_path / "store")
    rc = regcache(storage=storage)
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    digests = {name: f"sha256:{hex_}" for name, hex_ in dir_digests(str(tmp_path / "a")).items()}
    layers = [d for name, d in digests.items() if name != "manifest.json"]
    for digest in layers:
        status, headers, _ = rc.get(f"/v2/mirror/small/blobs/{digest}")
        assert (status, headers["X-Cache"]) == (200, "hit")
        assert len(answered(hub, "HEAD", f"/v2/mirror/small/blobs/{digest}")) == 1

    rc.stop()
    done = subprocess.run([sys.executable, "-m", "regcache", "verify", "--storage", storage],
                          capture_output=True, text=True, env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    rc.start()
    seen = len(hub.request_log())
    for digest in layers:
        assert rc.get(f"/v2/mirror/small/blobs/{digest}")[0] == 200
        assert rc.get(f"/v2/library/small/blobs/{digest}")[0] == 200
    status, _, _ = rc.get(f"/v2/library/small/manifests/{digests['manifest.json']}", headers={"Accept": ALL})
    assert status == 200
    assert hub.request_log()[seen:] == []
