# test-case-name: tests.integration.test_store_proc
"""
The store's promises with real processes: a real client resuming with Range,
``kill -9`` at the worst moments, a size limit far below the working set, a
disk that fills up, and start-up with a large store.

Each test checks with ``regcache verify`` and by pulling again (skopeo
checks every digest) that nothing served is corrupt, and with the fake Hub's
counters that what was complete is served without going upstream.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.fakes.images import moved_images
from tests.integration.clients import dir_digests, expected_files, skopeo_pull
from tests.integration.procs import REPO, Regcache
from tests.integration.synthetic import count_files, dangling, store_bytes, write_store
from tests.integration.procs import wait_for
from tests.support import small_filesystem

MiB = 1024 * 1024


def verify(storage):
    """(exit status, output) of ``regcache verify`` on a store."""
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "regcache", "verify", "--storage", storage],
                          capture_output=True, text=True, env=env, timeout=120)
    return done.returncode, done.stdout + done.stderr


def upstream_gets(hub, digests):
    stats = hub.stats()
    return {d: stats["cdn_blob_gets"].get(d, 0) for d in digests}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def blob_file(storage, digest):
    """Where a store keeps the blob ``digest``."""
    hex_ = digest.split(":", 1)[1]
    return os.path.join(storage, "blobs", "sha256", hex_[:2], hex_)


def pulled(image):
    """The single-platform image skopeo copies for ``image``."""
    return image.child("amd64") if image.children else image


class Sampler(threading.Thread):
    """Samples the bytes under blobs/ and tmp/ every 20 ms while a test runs."""

    def __init__(self, root):
        super().__init__(daemon=True)
        self.root = root
        self.samples = []
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self.stopped.is_set():
            self.mark()
            time.sleep(0.02)

    def mark(self, label=""):
        self.samples.append((round(time.monotonic() - self.t0, 3), store_bytes(self.root), label))

    def stop(self):
        self.stopped.set()
        self.join()


@pytest.fixture
def alternates(images_dir, hub):
    """Version 2 of the standard images, published by the fake Hub as tag ``2``."""
    moved = moved_images(images_dir)
    for name in moved:
        hub.move_tag(name.split(":")[0], "2", image=f"{name}#2")
    return moved


def stored_path(storage, digest):
    """Where regcache keeps a blob's or a manifest's bytes."""
    hex_ = digest.split(":", 1)[1]
    return os.path.join(storage, "blobs", "sha256", hex_[:2], hex_)


def get_manifest(rc, image, reference):
    """(status, Docker-Content-Digest, body) of a manifest GET."""
    status, headers, body = rc.get(f"/v2/{image.repo}/manifests/{reference}",
                                   headers={"Accept": image.media_type})
    return status, headers.get("Docker-Content-Digest"), body


def test_manifest_edited_on_disk_is_never_served(hub, regcache, images, tmp_path):
    """
    A manifest rewritten on disk (still valid JSON) while regcache was down
    is not served after the restart, by tag nor by digest: regcache fetches
    it again, skopeo pulls the image by tag, and verify passes.
    """
    image = images["library/small:1"]
    rc = regcache()
    assert get_manifest(rc, image, "1") == (200, image.digest, image.manifest)
    rc.stop()
    path = stored_path(rc.storage, image.digest)
    with open(path, "wb") as f:
        f.write(json.dumps(json.loads(image.manifest), indent=1).encode())
    gets = hub.stats()["manifest_gets_total"]
    rc.start()
    for reference in ("1", image.digest):
        assert get_manifest(rc, image, reference) == (200, image.digest, image.manifest), reference
    assert hub.stats()["manifest_gets_total"] == gets + 1
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "s")) == expected_files(image)
    code, out = verify(rc.storage)
    assert code == 0, out


def test_verify_beside_a_live_server_removes_a_manifest_for_good(hub, regcache, images):
    """
    ``regcache verify`` run beside a live server removes a manifest that
    rotted on disk, and the server notices: instead of its memory copy it
    fetches the manifest again, once, and stores it, so the next verify
    finds it on disk and clean.
    """
    image = images["library/small:1"]
    rc = regcache()
    assert get_manifest(rc, image, image.digest) == (200, image.digest, image.manifest)
    path = stored_path(rc.storage, image.digest)
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"\xff")
    code, out = verify(rc.storage)
    assert code == 1 and f"corrupt: {image.digest}" in out, out
    gets = hub.stats()["manifest_gets_total"]
    # Within store.RECHECK (a second) the server looks at the file again
    # and fetches the manifest; every answer meanwhile is the right one.

    def refetched():
        assert get_manifest(rc, image, image.digest) == (200, image.digest, image.manifest)
        return hub.stats()["manifest_gets_total"] > gets

    wait_for(refetched, timeout=30, what="the manifest fetched again")
    assert hub.stats()["manifest_gets_total"] == gets + 1
    with open(path, "rb") as f:
        assert f.read() == image.manifest
    code, out = verify(rc.storage)
    assert code == 0 and "checked 1 files" in out, out


def test_curl_resumes_a_broken_download(hub, regcache, images, tmp_path):
    """
    curl, cut off part-way through a cold blob, resumes with ``-C -`` (a
    ``Range: bytes=N-`` request) while regcache is still downloading it: the
    file is whole and exact, and upstream sent the blob once.
    """
    rc = regcache()
    layer = max(images["library/multi:1"].layers, key=lambda b: b.size)
    hub.fault("drip", scope="blobs", chunk=64 * 1024, interval=0.05)  # about 4 s for the layer
    url = f"{rc.url}/v2/library/multi/blobs/{layer.digest}"
    out = str(tmp_path / "layer")
    first = subprocess.run(["curl", "-sS", "--max-time", "1", "-o", out, url],
                           capture_output=True, text=True)
    assert first.returncode == 28, first.stderr  # cut off by --max-time
    assert 0 < os.path.getsize(out) < layer.size
    second = subprocess.run(["curl", "-sS", "-C", "-", "-o", out, "-w", "%{http_code}", url],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "206"
    assert sha256_file(out) == layer.digest
    assert hub.stats()["cdn_blob_gets"][layer.digest] == 1


def test_kill_during_a_large_cold_pull(hub, regcache, images, tmp_path):
    """
    ``kill -9`` while a 110 MiB layer is half downloaded: the store stays
    clean (verify passes), the partial download is removed at the next
    start, the image pulled before the kill is served with no upstream
    request, and the large image then pulls whole.
    """
    rc = regcache()
    small, large = images["library/small:1"], images["library/large:1"]
    assert skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "s")).returncode == 0
    layer = large.layers[0]
    hub.fault("drip", scope="blobs", path=layer.hex, chunk=2 * MiB, interval=0.02)
    puller = subprocess.Popen(["skopeo", "copy", "--src-tls-verify=false", f"docker://{rc.host}/library/large:1",
                               f"dir:{tmp_path / 'l'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = os.path.join(rc.storage, "tmp")

    def half_way():
        sizes = [os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp)]
        return any(s > layer.size // 3 for s in sizes)

    try:
        wait_for(half_way, what="the large layer to be part-way down")
        rc.kill()
    finally:
        puller.kill()
        puller.wait()
    assert os.listdir(tmp), "the kill left the partial download behind"
    code, out = verify(rc.storage)
    assert code == 0, out
    hub.clear_faults()
    before = hub.stats()
    rc.start()
    assert os.listdir(tmp) == []
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "s2"))
    assert r.returncode == 0, r.stderr
    after = hub.stats()
    assert after["cdn_blob_gets_total"] == before["cdn_blob_gets_total"]
    assert after["manifest_gets_total"] == before["manifest_gets_total"]
    r = skopeo_pull(f"{rc.host}/library/large:1", str(tmp_path / "l2"))
    assert r.returncode == 0, r.stderr
    assert dir_digests(str(tmp_path / "l2")) == expected_files(large)
    assert verify(rc.storage)[0] == 0


def test_kill_during_a_write_burst(hub, regcache, images, alternates, tmp_path):
    """
    ``kill -9`` while six pulls run at once, some finished and some not:
    verify passes, every image whose pull finished (and whose blobs landed)
    is served again with no upstream request, and the rest pull whole.
    """
    rc = regcache()
    large = images["library/large:1"]
    hub.fault("drip", scope="blobs", path=large.layers[0].hex, chunk=MiB, interval=0.05)
    refs = {
        "library/multi:1": pulled(images["library/multi:1"]),
        "library/multiarch:1": pulled(images["library/multiarch:1"]),
        "library/ociindex:1": pulled(images["library/ociindex:1"]),
        "library/small:2": alternates["library/small:1"],
        "library/multi:2": alternates["library/multi:1"],
        "library/large:1": large,
    }
    procs = {
        ref: subprocess.Popen(["skopeo", "copy", "--src-tls-verify=false", f"docker://{rc.host}/{ref}",
                               f"dir:{tmp_path / str(i)}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i, ref in enumerate(refs)
    }
    try:
        wait_for(lambda: sum(p.poll() == 0 for p in procs.values()) >= 3, what="three pulls to finish")
        done = [ref for ref, p in procs.items() if p.poll() == 0]
        for ref in done:
            for blob in refs[ref].blobs():
                wait_for(lambda: f"Blob fill landed: {blob.digest}" in rc.log(), what=f"{blob.digest} to land")
        rc.kill()
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    assert "library/large:1" not in done
    code, out = verify(rc.storage)
    assert code == 0, out
    hub.clear_faults()
    rc.start()
    for ref in done:
        blobs = [b.digest for b in refs[ref].blobs()]
        before, manifests = upstream_gets(hub, blobs), hub.stats()["manifest_gets_total"]
        r = skopeo_pull(f"{rc.host}/{ref}", str(tmp_path / "again"))
        assert r.returncode == 0, r.stderr
        assert upstream_gets(hub, blobs) == before, ref
        assert hub.stats()["manifest_gets_total"] == manifests, ref
    for ref in refs:
        if ref not in done:
            r = skopeo_pull(f"{rc.host}/{ref}", str(tmp_path / "rest"))
            assert r.returncode == 0, r.stderr
            assert dir_digests(str(tmp_path / "rest")) == expected_files(refs[ref])
    assert verify(rc.storage)[0] == 0


def test_kill_during_eviction(hub, regcache, images, tmp_path):
    """
    ``kill -9`` while the start-up eviction deletes thousands of files:
    no manifest is left naming a deleted blob, verify passes, and after a
    restart the eviction finishes, the store is under its limit, and the
    image that was most recently used is still served without upstream.
    """
    storage = str(tmp_path / "store")
    rc = regcache(storage=storage)
    assert skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "s")).returncode == 0
    rc.stop()
    write_store(storage, 3000)
    files = count_files(storage)
    limit = store_bytes(storage) // 10
    rc = regcache("--max-size", str(limit), storage=storage)

    def deleting():
        return count_files(storage) < files

    wait_for(deleting, what="eviction to start")
    rc.kill()
    left = count_files(storage)
    assert dangling(storage) == []
    code, out = verify(storage)
    assert code == 0, out
    before = hub.stats()
    rc.start()
    wait_for(lambda: store_bytes(storage) <= limit, what="the eviction to finish")
    assert dangling(storage) == []
    r = skopeo_pull(f"{rc.host}/library/small:1", str(tmp_path / "s2"))
    assert r.returncode == 0, r.stderr
    after = hub.stats()
    assert after["cdn_blob_gets_total"] == before["cdn_blob_gets_total"]
    assert after["manifest_gets_total"] == before["manifest_gets_total"]
    print(f"kill during eviction: {files} files, {left} left at the kill, {count_files(storage)} after restart")


def test_pulls_stay_under_the_size_limit(hub, regcache, images, alternates, tmp_path):
    """
    With --max-size 20 MiB against a ~34 MiB working set, a sequence of
    pulls keeps the bytes on disk under the limit at every sample, evicts in
    LRU order (the image used again survives, the older one goes), and
    images pulled while eviction runs arrive intact.
    """
    limit = 20 * MiB
    rc = regcache("--max-size", str(limit))
    sampler = Sampler(rc.storage)
    sampler.start()

    def pull(ref, image, dest):
        r = skopeo_pull(f"{rc.host}/{ref}", str(tmp_path / dest))
        assert r.returncode == 0, r.stderr
        assert dir_digests(str(tmp_path / dest)) == expected_files(image)
        sampler.mark(ref)

    try:
        for ref in ("library/small:1", "library/multi:1", "library/multiarch:1", "library/ociindex:1"):
            pull(ref, pulled(images[ref]), "a")
        pull("library/small:1", images["library/small:1"], "a")  # used again: now the newest
        multi2 = alternates["library/multi:1"]
        pull("library/multi:2", multi2, "b")
        small1 = [b.digest for b in images["library/small:1"].blobs()]
        multi1 = [b.digest for b in images["library/multi:1"].blobs()]
        before = upstream_gets(hub, small1 + multi1)
        pull("library/small:1", images["library/small:1"], "c")
        assert upstream_gets(hub, small1) == {d: before[d] for d in small1}, "LRU: the reused image was evicted"
        threads = [
            threading.Thread(target=pull, args=(ref, image, f"p{i}"))
            for i, (ref, image) in enumerate([
                ("library/multi:1", images["library/multi:1"]),
                ("library/small:2", alternates["library/small:1"]),
                ("library/multiarch:2", pulled(alternates["library/multiarch:1"])),
            ])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gets = upstream_gets(hub, multi1)
        assert all(gets[d] > before[d] for d in multi1[1:]), "the oldest image was not evicted"
    finally:
        sampler.stop()
    peak = max(b for _, b, _ in sampler.samples)
    print("store size over time (s, bytes, after):", json.dumps([s for s in sampler.samples if s[2]] + [
        ("peak", peak, "")]))
    assert peak <= limit, f"store reached {peak} bytes, over its {limit} limit"
    assert "Evicted" in rc.log()
    assert verify(rc.storage)[0] == 0


def test_disk_full_during_a_pull(hub, regcache, images, alternates, tmp_path):
    """
    On a 24 MiB tmpfs that fills up during a download: the client sees an
    aborted connection (curl fails, never a clean short body), the temp
    file is gone, the process stays up, eviction makes room, and the same
    blob then downloads whole.
    """
    with small_filesystem("24m") as storage:
        rc = regcache(storage=storage)  # its log goes beside the mount point, not onto the full disk
        r = skopeo_pull(f"{rc.host}/library/multi:1", str(tmp_path / "m"))
        assert r.returncode == 0, r.stderr
        layer = max(alternates["library/multi:1"].layers, key=lambda b: b.size)
        st = os.statvfs(storage)
        with open(os.path.join(storage, "filler"), "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - layer.size // 2))
        url = f"{rc.url}/v2/library/multi/blobs/{layer.digest}"
        out = str(tmp_path / "layer")
        first = subprocess.run(["curl", "-sS", "-o", out, url], capture_output=True, text=True, timeout=60)
        assert first.returncode != 0, "a body cut short by a full disk must not end cleanly"
        assert os.path.getsize(out) < layer.size
        assert rc.proc.poll() is None
        assert rc.get("/healthz")[0] == 200
        wait_for(lambda: "Disk full" in rc.log() and "Evicted" in rc.log(), what="the eviction")
        assert os.listdir(os.path.join(storage, "tmp")) == []
        second = subprocess.run(["curl", "-sS", "-o", out, url], capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert sha256_file(out) == layer.digest
        code, out_text = verify(storage)
        assert code == 0, out_text
        rc.stop()


def test_startup_indexes_ten_thousand_blobs_from_their_files(hub, tmp_path):
    """
    A store of 10,000 blobs, one of them rotted (other bytes, same size), is
    indexed at start from the files' names and stats: the index counts every
    file and every byte, the rotted one too, since nothing is hashed
    (finding rot is ``regcache verify``'s job).  Under a --max-size the
    store exceeds, eviction works from that index in the order of the
    files' mtimes: the oldest images go, the newest stays, and no manifest
    is left naming a deleted blob.  (bench's startup phase times this.)
    """
    storage = str(tmp_path / "store")
    os.makedirs(storage)
    written = write_store(storage, 3334)
    manifests = list(written)
    rotted = written[manifests[len(manifests) // 2]][0]
    with open(blob_file(storage, rotted), "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in data))
    files, size = count_files(storage), store_bytes(storage)
    limit = size // 2
    rc = Regcache(storage, hub.registry_url, ["--max-size", str(limit)]).start()
    try:
        wait_for(lambda: "Indexed" in rc.log(), what="the index")
        assert f"Indexed {files} cached files, {size} bytes" in rc.log()
        wait_for(lambda: store_bytes(storage) <= limit, what="the eviction")
        oldest, newest = manifests[0], manifests[-1]
        assert not any(os.path.exists(blob_file(storage, d)) for d in [oldest, *written[oldest]])
        assert all(os.path.exists(blob_file(storage, d)) for d in [newest, *written[newest]])
        assert dangling(storage) == []
    finally:
        rc.stop()
