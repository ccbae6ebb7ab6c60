# test-case-name: tests.integration.test_blob_head_proc
"""
A real client's HEAD of a blob regcache does not hold (containerd's
FetchByDigest HEADs first) costs upstream one HEAD, not a download.
"""

import os


def files_under(storage, *subs):
    return [f for sub in subs for _, _, fs in os.walk(os.path.join(storage, sub)) for f in fs]


def test_head_of_a_cold_blob_downloads_nothing(hub, regcache, images, tmp_path):
    """
    HEAD of a cold 110 MiB layer answers its size and digest with one
    upstream HEAD and no GET, and leaves nothing in the store; the GET that
    follows downloads it once.
    """
    storage = str(tmp_path / "store")
    rc = regcache(storage=storage)
    layer = images["library/large:1"].layers[0]
    path = f"/v2/library/large/blobs/{layer.digest}"
    status, headers, body = rc.get(path, "HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str(layer.size)
    assert headers["Docker-Content-Digest"] == layer.digest
    stats = hub.stats()
    assert stats["registry_blob_heads"].get(layer.digest) == 1
    assert stats["registry_blob_gets"].get(layer.digest, 0) == 0
    assert stats["cdn_blob_gets"].get(layer.digest, 0) == 0
    assert files_under(storage, "blobs", "tmp") == []
    status, _, body = rc.get(path)
    assert status == 200 and len(body) == layer.size
    assert hub.stats()["cdn_blob_gets"][layer.digest] == 1
