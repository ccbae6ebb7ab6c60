# test-case-name: tests.integration.test_referrers_proc
"""
Signatures pull through a real regcache process in front of the fake Hub:
by the OCI 1.1 referrers API (the index, then the artifact's manifest and
blob by digest), and, when the upstream has no such API, by the tag schema
(``sha256-<hex>.sig``), which a real client (skopeo) pulls like any tag.
"""

import hashlib
import json
import os

from tests.integration.clients import dir_digests, skopeo_pull

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
COSIGN_SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"


def signature(hub, images):
    """(tag, digest) of the fake Hub's signature of library/small:1."""
    subject = images["library/small:1"].digest
    tag = subject.replace(":", "-") + ".sig"
    return tag, hub.info["artifacts"][f"library/small:{tag}"]


def test_referrers_pull_of_a_signature(hub, regcache, images):
    """
    A client finds the signature attached to an image through the referrers
    API, then pulls its manifest and blob by digest, every byte verified.
    """
    rc = regcache()
    subject = images["library/small:1"].digest
    _, sig = signature(hub, images)
    status, headers, body = rc.get(f"/v2/library/small/referrers/{subject}?artifactType={COSIGN_SIG.replace('+', '%2B')}")
    assert status == 200, body
    assert headers["Content-Type"] == OCI_INDEX
    assert headers["OCI-Filters-Applied"] == "artifactType"
    index = json.loads(body)
    assert [(m["digest"], m["artifactType"]) for m in index["manifests"]] == [(sig, COSIGN_SIG)]

    status, headers, manifest = rc.get(f"/v2/library/small/manifests/{sig}", headers={"Accept": OCI_MANIFEST})
    assert status == 200, manifest
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == sig
    doc = json.loads(manifest)
    assert doc["subject"]["digest"] == subject and doc["artifactType"] == COSIGN_SIG
    layer = doc["layers"][0]["digest"]
    status, _, blob = rc.get(f"/v2/library/small/blobs/{layer}")
    assert status == 200, blob
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer

    before = hub.stats()["referrers_gets"]
    status, _, again = rc.get(f"/v2/library/small/referrers/{subject}?artifactType={COSIGN_SIG.replace('+', '%2B')}")
    assert (status, again) == (200, body)
    assert hub.stats()["referrers_gets"] == before


def test_fallback_to_the_sig_tag(hub, regcache, images, tmp_path):
    """
    With the upstream's referrers API off, regcache answers 404 as upstream
    did, and again from memory within the tag window (no second request
    upstream), and the sha256-<hex>.sig tag a client then falls back to
    pulls through with skopeo, byte for byte.
    """
    hub.referrers(False)
    rc = regcache()
    subject = images["library/small:1"].digest
    tag, sig = signature(hub, images)
    status, _, body = rc.get(f"/v2/library/small/referrers/{subject}")
    assert status == 404, body
    asked = hub.stats()["referrers_gets"]
    assert sum(asked.values()) == 1
    status, _, again = rc.get(f"/v2/library/small/referrers/{subject}")
    assert (status, again) == (404, body)
    assert hub.stats()["referrers_gets"] == asked

    dest = str(tmp_path / "sig")
    r = skopeo_pull(f"{rc.host}/library/small:{tag}", dest)
    assert r.returncode == 0, r.stderr
    files = dir_digests(dest)
    assert files["manifest.json"] == sig.split(":")[1]
    with open(os.path.join(dest, "manifest.json"), "rb") as f:
        layer = json.loads(f.read())["layers"][0]["digest"].split(":")[1]
    assert files[layer] == layer
