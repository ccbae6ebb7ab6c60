# test-case-name: tests.test_referrers
"""
The OCI 1.1 referrers API through the mirror, in memory against the fake
Hub: the index is asked of the upstream that serves the name, kept for the
tag window, served stale during an outage, refused when it is not an image
index, and an upstream without the API gets its 404 passed on so that
clients fall back to ``sha256-<hex>`` tags.
"""

import json
import os
from urllib.parse import urlencode

from twisted.trial.unittest import SynchronousTestCase

from regcache.manifests import check_index
from regcache import mirror
from regcache.mirror import STALE_WARNING
from tests.fakes.images import COSIGN_SIG
from tests.support import HubRig

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ALL = ", ".join(["application/vnd.docker.distribution.manifest.v2+json", OCI_INDEX,
                 "application/vnd.oci.image.manifest.v1+json"])


def code(client):
    return json.loads(client.body())["errors"][0]["code"]


class ReferrersTests(SynchronousTestCase):
    def setUp(self):
        self.rig = HubRig(tag_ttl=60)
        self.subject = self.rig.images["library/small:1"].digest
        self.path = f"/v2/library/small/referrers/{self.subject}"

    def gets(self, rig=None):
        return sum((rig or self.rig).stats()["referrers_gets"].values())

    def test_index_lists_the_signature(self):
        """A referrers GET answers the upstream's image index, naming the signature attached to the image."""
        c = self.rig.get(self.path)
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Content-Type"), OCI_INDEX)
        index = json.loads(c.body())
        self.assertEqual(index["mediaType"], OCI_INDEX)
        self.assertEqual([(m["digest"], m["artifactType"]) for m in index["manifests"]],
                         [(self.rig.signature.digest, COSIGN_SIG)])
        self.assertEqual(int(c.header("Content-Length")), len(c.body()))

    def test_short_name_goes_to_the_upstream_name(self):
        """A one-component name is asked of Docker Hub under library/, like any pull."""
        c = self.rig.get(f"/v2/small/referrers/{self.subject}")
        self.assertEqual(c.status(), 200)
        self.assertEqual(list(self.rig.stats()["referrers_gets"]), [f"library/small@{self.subject}"])

    def test_cached_for_the_tag_window(self):
        """Within --tag-ttl the index is served from cache; after it, upstream is asked again."""
        first = self.rig.get(self.path)
        self.rig.pass_time(30)
        second = self.rig.get(self.path)
        self.assertEqual(second.body(), first.body())
        self.assertEqual(self.gets(), 1)
        self.rig.pass_time(31)
        self.rig.get(self.path)
        self.assertEqual(self.gets(), 2)

    def test_new_referrer_seen_after_the_window(self):
        """A signature added upstream shows once the window has passed: the cache is a window, not forever."""
        self.rig.get(self.path)
        self.rig.hub.repos["library/small"].manifests.pop(self.rig.signature.digest)
        self.rig.pass_time(61)
        c = self.rig.get(self.path)
        self.assertEqual(json.loads(c.body())["manifests"], [])

    def test_stale_on_outage(self):
        """When upstream fails after the window, the last index is served with a Warning."""
        first = self.rig.get(self.path)
        self.rig.pass_time(61)
        self.rig.hub.fault("status", scope="referrers", status=503)
        c = self.rig.get(self.path)
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), first.body())
        self.assertEqual(c.header("Warning"), STALE_WARNING)

    def test_outage_without_a_copy(self):
        """With nothing cached, an upstream failure is a 503 in words, not a 404 that would send clients elsewhere."""
        self.rig.hub.fault("status", scope="referrers", status=503)
        c = self.rig.client(self.path)
        self.rig.pass_time(15)
        self.assertEqual(c.status(), 503)
        self.assertEqual(code(c), "UNAVAILABLE")

    def test_max_stale_bounds_the_stale_index(self):
        """Past --max-stale since its last good fetch, the index is no longer served on error."""
        rig = HubRig(tag_ttl=60, max_stale=120)
        path = f"/v2/library/small/referrers/{self.subject}"
        rig.get(path)
        rig.hub.fault("status", scope="referrers", status=503)
        rig.pass_time(100)
        self.assertEqual(rig.get(path).status(), 200)
        rig.pass_time(30)
        c = rig.client(path)
        rig.pass_time(15)
        self.assertEqual(c.status(), 503)

    def test_kept_on_disk_across_a_restart(self):
        """A restarted regcache serves the index it fetched before, stale, while upstream is down."""
        rig = HubRig(tag_ttl=60)
        first = rig.get(f"/v2/library/small/referrers/{self.subject}")
        again = HubRig(tag_ttl=60, root=rig.root)
        again.reactor.advance(61)
        again.hub.fault("status", scope="referrers", status=503)
        c = again.get(f"/v2/library/small/referrers/{self.subject}")
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.body(), first.body())
        self.assertEqual(c.header("Warning"), STALE_WARNING)

    def test_counted_under_the_tag_bound(self):
        """
        What the index files take on disk counts in the bound tag files
        have (see regcache.tags), when written and again after a restart.
        """
        before = self.rig.mirror.tags.bytes
        self.rig.get(self.path)
        self.assertGreater(self.rig.mirror.tags.bytes, before)
        fresh = HubRig(root=self.rig.root)
        self.assertEqual(fresh.mirror.tags.bytes, self.rig.mirror.tags.bytes)

    def test_404_passed_on(self):
        """An upstream without the API answers 404, and so does regcache, so that clients fall back to tags."""
        self.rig.hub.referrers_api = False
        c = self.rig.get(self.path)
        self.assertEqual(c.status(), 404)
        self.assertEqual(code(c), "NAME_UNKNOWN")

    def test_404_is_not_cached_as_an_index(self):
        """A 404 leaves no index behind: the API turned on upstream is seen once the window has passed."""
        self.rig.hub.referrers_api = False
        self.rig.get(self.path)
        self.rig.hub.referrers_api = True
        self.rig.pass_time(61)
        self.assertEqual(self.rig.get(self.path).status(), 200)

    def test_404_kept_for_the_window_per_repository(self):
        """
        Within the tag window a repository whose upstream has no referrers
        API answers every subject's lookup with the 404 from memory: one
        upstream request, not one per signature check.  Another repository
        still asks.
        """
        self.rig.hub.referrers_api = False
        other = self.rig.images["library/multi:1"].digest
        signature = self.rig.signature.digest
        for path in (self.path, f"/v2/library/small/referrers/{signature}", self.path):
            c = self.rig.get(path)
            self.assertEqual((c.status(), code(c)), (404, "NAME_UNKNOWN"), path)
        self.assertEqual(self.gets(), 1)
        self.assertEqual(self.rig.get(f"/v2/library/multi/referrers/{other}").status(), 404)
        self.assertEqual(self.gets(), 2)
        self.rig.pass_time(61)
        self.assertEqual(self.rig.get(self.path).status(), 404)
        self.assertEqual(self.gets(), 3)

    def test_404s_remembered_are_bounded(self):
        """Past MAX_NO_REFERRERS repositories the least recently told is forgotten, and asked again."""
        self.patch(mirror, "MAX_NO_REFERRERS", 1)
        self.rig.hub.referrers_api = False
        other = self.rig.images["library/multi:1"].digest
        multi = f"/v2/library/multi/referrers/{other}"
        for path in (self.path, multi, self.path):
            self.assertEqual(self.rig.get(path).status(), 404)
        self.assertEqual(self.gets(), 3)
        self.assertEqual(len(self.rig.mirror._no_referrers), 1)

    def test_404_even_with_a_cached_copy(self):
        """Upstream's 404 is its answer, not an outage: a cached index does not stand in for it."""
        self.rig.get(self.path)
        self.rig.pass_time(61)
        self.rig.hub.referrers_api = False
        self.assertEqual(self.rig.get(self.path).status(), 404)

    def test_fallback_tag_pulls_through(self):
        """With the API off, the sha256-<hex>.sig tag pulls through like any tag, and its blobs too."""
        self.rig.hub.referrers_api = False
        tag = self.subject.replace(":", "-") + ".sig"
        c = self.rig.get(f"/v2/library/small/manifests/{tag}", headers={"Accept": ALL})
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Docker-Content-Digest"), self.rig.signature.digest)
        manifest = json.loads(c.body())
        self.assertEqual(manifest["subject"]["digest"], self.subject)
        layer = manifest["layers"][0]["digest"]
        b = self.rig.get(f"/v2/library/small/blobs/{layer}")
        self.assertEqual(b.status(), 200)
        self.assertEqual(b.body(), self.rig.signature.layers[0].read_bytes())

    def test_artifact_type_filter(self):
        """artifactType goes upstream; OCI-Filters-Applied is passed on when upstream applied it."""
        c = self.rig.get(self.path + "?" + urlencode({"artifactType": COSIGN_SIG}))
        self.assertEqual(c.header("OCI-Filters-Applied"), "artifactType")
        self.assertEqual(len(json.loads(c.body())["manifests"]), 1)
        other = self.rig.get(self.path + "?artifactType=application/vnd.example.sbom%2Bjson")
        self.assertEqual(json.loads(other.body())["manifests"], [])
        unfiltered = self.rig.get(self.path)
        self.assertIsNone(unfiltered.header("OCI-Filters-Applied"))
        self.assertEqual(len(json.loads(unfiltered.body())["manifests"]), 1)
        seen = [r["path"] for r in self.rig.hub.requests if "/referrers/" in r["path"] and r["status"] == 200]
        self.assertEqual(seen, [self.path + "?" + urlencode({"artifactType": COSIGN_SIG}),
                                self.path + "?artifactType=application%2Fvnd.example.sbom%2Bjson", self.path])

    def test_filtered_answer_cached_per_artifact_type(self):
        """Each artifactType has its own cache entry, and a stale one keeps its OCI-Filters-Applied."""
        self.rig.get(self.path + "?" + urlencode({"artifactType": COSIGN_SIG}))
        self.rig.get(self.path)
        self.assertEqual(self.gets(), 2)
        self.rig.pass_time(61)
        self.rig.hub.fault("status", scope="referrers", status=503)
        c = self.rig.get(self.path + "?" + urlencode({"artifactType": COSIGN_SIG}))
        self.assertEqual(c.header("Warning"), STALE_WARNING)
        self.assertEqual(c.header("OCI-Filters-Applied"), "artifactType")

    def test_bad_artifact_type(self):
        """An artifactType that is not a media type is refused before anything goes upstream."""
        for bad in ("x" * 300, "a/b c", "a/" + "b" * 200, ""):
            c = self.rig.get(self.path + "?" + urlencode({"artifactType": bad}))
            self.assertEqual(c.status(), 400, bad)
        self.assertEqual(self.gets(), 0)

    def test_head(self):
        """HEAD answers the GET's status and headers with no body."""
        get = self.rig.get(self.path)
        head = self.rig.get(self.path, "HEAD")
        self.assertEqual(head.status(), 200)
        self.assertEqual(head.header("Content-Length"), get.header("Content-Length"))
        self.assertEqual(head.header("Content-Type"), OCI_INDEX)
        self.assertEqual(head.body(), b"")

    def test_bad_digest(self):
        """A malformed digest is a 400 DIGEST_INVALID, and nothing is asked upstream."""
        for bad in ("sha256:abc", "latest", "sha256:" + "A" * 64):
            c = self.rig.get(f"/v2/library/small/referrers/{bad}")
            self.assertEqual(c.status(), 400, bad)
            self.assertEqual(code(c), "DIGEST_INVALID", bad)
        self.assertEqual(self.gets(), 0)

    def test_bad_bodies(self):
        """Bytes that are not an image index, or too many of them, are a 502 and never cached."""
        for fault in (dict(kind="wrong"), dict(kind="huge", size=5 * 1024 * 1024, chunk=1024 * 1024)):
            rig = HubRig()
            rig.hub.fault(scope="referrers", times=1, **fault)
            c = rig.get(f"/v2/library/small/referrers/{self.subject}")
            rig.pass_time(5)
            self.assertEqual(c.status(), 502, fault)
            self.assertEqual(rig.get(f"/v2/library/small/referrers/{self.subject}").status(), 200, fault)

    def test_not_an_index(self):
        """Only an image index passes: not a list, a manifest, a bad descriptor or bytes that are no JSON."""
        good = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
        self.assertIsNone(check_index(good))
        for body in (b"[]", b'{"schemaVersion": 2}', b'{"schemaVersion": 2, "manifests": {}}',
                     b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "manifests": []}',
                     b'{"schemaVersion": 2, "manifests": [{"digest": "nope", "size": 1, "mediaType": "a/b"}]}',
                     b'{"schemaVersion": 2, "manifests": [1]}', b"\xff"):
            with self.assertRaises(ValueError, msg=body):
                check_index(body)

    def test_no_temp_files_left(self):
        """Writing an index leaves nothing in the store's tmp directory."""
        self.rig.get(self.path)
        self.assertEqual(os.listdir(self.rig.store.tmp_dir), [])
