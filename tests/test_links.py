# test-case-name: tests.test_links
"""
Per-repository links, in memory against the fake Hub: content stored once
per digest is served under a repository only where regcache knows that
repository holds it, and upstream is asked (a HEAD in that repository's
scope, never a GET) before it is served under any other name.
"""

import json
import os
import shutil

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from regcache import links, mirror as mirror_module
from regcache.auth import Credentials
from regcache.errors import UpstreamNotFound
from regcache.expiry import Expiry
from regcache.reference import Digest
from tests.support import FedBody, HubRig, Rig, blob

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ALL = ", ".join([SCHEMA2, LIST, OCI, OCI_INDEX])


def code(client):
    return json.loads(client.body())["errors"][0]["code"]


def heads(rig, path):
    """The HEADs the fake Hub's registry answered for ``path`` (not the 401s of the token dance)."""
    return [r for r in rig.hub.requests if r["method"] == "HEAD" and r["path"] == path and r["status"] != 401]


def gets(rig, path):
    """Every GET the fake Hub's registry got for ``path``."""
    return [r for r in rig.hub.requests if r["method"] == "GET" and r["path"] == path]


class Pulled:
    """A HubRig with the account's credentials that pulled ci/private:1 and its blobs through regcache."""

    def __init__(self, test, **options):
        self.rig = rig = HubRig(credentials=Credentials("ci", "s3cret"), **options)
        test.addCleanup(shutil.rmtree, rig.root, True)
        self.image = rig.private
        c = rig.get("/v2/ci/private/manifests/1", headers={"Accept": ALL})
        test.assertEqual(c.status(), 200, c.body())
        for b in self.image.blobs():
            c = rig.get(f"/v2/ci/private/blobs/{b.digest}")
            test.assertEqual(c.status(), 200, c.body())
        self.layer = self.image.layers[0].digest


class LeakTests(SynchronousTestCase):
    def test_private_blobs_are_unknown_under_a_public_name(self):
        """
        A layer and config cached for ci/private are a 404 BLOB_UNKNOWN as
        library/small's: upstream was asked with a HEAD in library/small's
        scope, which said no, and nothing was downloaded again.
        """
        pulled = Pulled(self)
        rig = pulled.rig
        cdn = dict(rig.stats()["cdn_blob_gets"])
        for b in pulled.image.blobs():
            for method in ("GET", "HEAD"):
                c = rig.get(f"/v2/library/small/blobs/{b.digest}", method)
                self.assertEqual(c.status(), 404, (b.digest, method))
                if method == "GET":
                    self.assertEqual(code(c), "BLOB_UNKNOWN")
            self.assertEqual(len(heads(rig, f"/v2/library/small/blobs/{b.digest}")), 2)
            self.assertEqual(gets(rig, f"/v2/library/small/blobs/{b.digest}"), [])
        self.assertEqual(rig.stats()["cdn_blob_gets"], cdn)
        self.assertEqual(rig.metrics.link_confirmations.labels("docker.io", "unknown")._value.get(), 4)

    def test_private_manifest_is_unknown_under_a_public_name(self):
        """
        The private manifest by digest under library/small is a 404
        MANIFEST_UNKNOWN after one HEAD there, and no counted GET.
        """
        pulled = Pulled(self)
        rig = pulled.rig
        path = f"/v2/library/small/manifests/{pulled.image.digest}"
        c = rig.get(path, headers={"Accept": ALL})
        self.assertEqual(c.status(), 404)
        self.assertEqual(code(c), "MANIFEST_UNKNOWN")
        self.assertEqual(len(heads(rig, path)), 1)
        self.assertNotIn("library/small", rig.stats()["manifest_gets"])

    def test_the_private_repository_itself_is_served_with_no_confirmation(self):
        """Under its own name the cached image is served again with nothing asked upstream."""
        pulled = Pulled(self)
        rig = pulled.rig
        before = len(rig.hub.requests)
        c = rig.get(f"/v2/ci/private/manifests/{pulled.image.digest}", headers={"Accept": ALL})
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "hit"))
        for b in pulled.image.blobs():
            c = rig.get(f"/v2/ci/private/blobs/{b.digest}")
            self.assertEqual((c.status(), c.header("X-Cache")), (200, "hit"))
        self.assertEqual(len(rig.hub.requests), before)

    def test_upstream_that_cannot_confirm_is_a_503(self):
        """
        While upstream fails the confirmation, an unlinked cached manifest
        is a 503 saying why, never served; once upstream answers, a 404.
        """
        pulled = Pulled(self)
        rig = pulled.rig
        rig.hub.fault("status", scope="manifests", status=503)
        path = f"/v2/library/small/manifests/{pulled.image.digest}"
        c = rig.get(path, headers={"Accept": ALL})
        self.assertEqual(c.status(), 503)
        message = json.loads(c.body())["errors"][0]["message"]
        self.assertIn("is cached but not known to belong to library/small", message)
        self.assertIn("upstream cannot confirm it", message)
        self.assertEqual(rig.metrics.link_confirmations.labels("docker.io", "failed")._value.get(), 1)
        rig.hub.clear_faults()
        self.assertEqual(rig.get(path, headers={"Accept": ALL}).status(), 404)


class ConfirmationTests(SynchronousTestCase):
    def setUp(self):
        self.rig = HubRig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)
        self.image = self.rig.images["library/small:1"]
        # The same image in a second repository, as a fork or a re-tag would have it.
        self.rig.hub.add_image(self.image, repo="mirror/small")
        c = self.rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual(c.status(), 200)
        for b in self.image.blobs():
            self.assertEqual(self.rig.get(f"/v2/library/small/blobs/{b.digest}").status(), 200)
        self.layer = self.image.layers[0].digest

    def test_confirmed_blob_is_served_from_cache_and_linked(self):
        """
        A blob upstream confirms in the other repository is served from
        the cache (no download), and from then on with no HEAD at all; the
        link is in the digest's links file.
        """
        rig = self.rig
        path = f"/v2/mirror/small/blobs/{self.layer}"
        c = rig.get(path)
        self.assertEqual((c.status(), c.header("X-Cache")), (200, "hit"))
        self.assertEqual(c.body(), self.image.layers[0].read_bytes())
        self.assertEqual(rig.stats()["cdn_blob_gets"][self.layer], 1)
        self.assertEqual(rig.get(path).status(), 200)
        self.assertEqual(len(heads(rig, path)), 1)
        links_file = os.path.join(rig.root, "links", "sha256", self.layer[7:9], self.layer[7:])
        self.assertEqual(links.read(links_file), [("docker.io", "library/small"), ("docker.io", "mirror/small")])
        self.assertEqual(rig.metrics.link_confirmations.labels("docker.io", "confirmed")._value.get(), 1)

    def test_concurrent_confirmations_are_shared(self):
        """Three clients asking at once for an unlinked blob cost one HEAD upstream."""
        rig = self.rig
        path = f"/v2/mirror/small/blobs/{self.layer}"
        clients = [rig.client(path) for _ in range(3)]
        rig.settle()
        self.assertEqual([c.status() for c in clients], [200] * 3)
        self.assertEqual(len(heads(rig, path)), 1)

    def test_confirmations_under_way_are_bounded(self):
        """
        Past MAX_CONFIRMATIONS distinct confirmations under way, another is
        a 503 at once, asking nothing upstream.
        """
        self.patch(mirror_module, "MAX_CONFIRMATIONS", 1)
        rig = self.rig
        rig.hub.fault("hang", scope="manifests")
        digest = self.image.digest
        first = rig.client(f"/v2/mirror/small/manifests/{digest}", headers={"Accept": ALL})
        rig.settle()
        second = rig.client(f"/v2/other/small/manifests/{digest}", headers={"Accept": ALL})
        rig.settle()
        self.assertEqual(second.status(), 503)
        self.assertIn("too many confirmations", json.loads(second.body())["errors"][0]["message"])
        self.assertEqual(heads(rig, f"/v2/other/small/manifests/{digest}"), [])
        self.assertEqual(first.raw(), b"")

    def test_tag_of_the_repository_vouches_for_its_manifest(self):
        """
        A manifest cached through another repository is served by that
        repository's tag with no confirmation: the tag's HEAD named it.
        """
        rig = self.rig
        c = rig.get("/v2/mirror/small/manifests/1", headers={"Accept": ALL})
        self.assertEqual((c.status(), c.header("Docker-Content-Digest")), (200, self.image.digest))
        self.assertEqual(heads(rig, f"/v2/mirror/small/manifests/{self.image.digest}"), [])
        self.assertNotIn("mirror/small", rig.stats()["manifest_gets"])
        # Its layers are now named by a manifest of mirror/small.
        c = rig.get(f"/v2/mirror/small/blobs/{self.layer}")
        self.assertEqual(c.status(), 200)
        self.assertEqual(heads(rig, f"/v2/mirror/small/blobs/{self.layer}"), [])

    def test_a_subject_is_not_its_signatures_repository(self):
        """
        A signature pulled from one repository does not make the image it
        signs (its subject) that repository's: asked there by digest, the
        subject is confirmed upstream, which says no.
        """
        rig = self.rig
        rig.hub.add_image(rig.signature, repo="other/sigs")
        c = rig.get(f"/v2/other/sigs/manifests/{rig.signature.tag}", headers={"Accept": ALL})
        self.assertEqual(c.status(), 200)
        path = f"/v2/other/sigs/manifests/{self.image.digest}"
        self.assertEqual(rig.get(path, headers={"Accept": ALL}).status(), 404)
        self.assertEqual(len(heads(rig, path)), 1)

    def test_referrers_need_the_subject_linked(self):
        """
        The referrers of a cached subject are served under a repository
        only once upstream confirmed the subject there: under a repository
        without it, a 404 and no referrers request upstream.
        """
        rig = self.rig
        subject = self.image.digest
        self.assertEqual(rig.get(f"/v2/library/small/referrers/{subject}").status(), 200)
        c = rig.get(f"/v2/nobody/else/referrers/{subject}")
        self.assertEqual(c.status(), 404)
        self.assertEqual(code(c), "MANIFEST_UNKNOWN")
        self.assertNotIn(f"nobody/else@{subject}", rig.stats()["referrers_gets"])
        self.assertEqual(rig.get(f"/v2/mirror/small/referrers/{subject}").status(), 200)


class IndexTests(SynchronousTestCase):
    def test_an_index_links_its_children_and_their_layers(self):
        """
        A manifest list pulled from a repository makes its child manifests
        and their layers that repository's: served by digest with no HEAD;
        under another name the child is confirmed and unknown.
        """
        rig = HubRig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        image = rig.images["library/multiarch:1"]
        self.assertEqual(rig.get("/v2/library/multiarch/manifests/1", headers={"Accept": ALL}).status(), 200)
        for child in image.children:
            self.assertEqual(rig.get(f"/v2/library/multiarch/manifests/{child.digest}",
                                     headers={"Accept": ALL}).status(), 200)
        child = image.children[0]
        before = rig.stats()["manifest_heads_total"]
        # Cached, named by a cached manifest of the repository: no HEAD.
        for b in child.blobs():
            self.assertEqual(rig.get(f"/v2/library/multiarch/blobs/{b.digest}").status(), 200)
            self.assertEqual(rig.get(f"/v2/library/multiarch/blobs/{b.digest}", "HEAD").status(), 200)
        self.assertEqual(rig.stats()["manifest_heads_total"], before)
        self.assertEqual(sum(rig.stats()["registry_blob_heads"].values()), 0)
        path = f"/v2/library/small/manifests/{child.digest}"
        self.assertEqual(rig.get(path, headers={"Accept": ALL}).status(), 404)
        self.assertEqual(len(heads(rig, path)), 1)


class JoinTests(SynchronousTestCase):
    def test_a_fill_for_one_repository_is_not_followed_under_another(self):
        """
        A download under way for library/a is joined under other/b only
        after upstream confirmed the blob there: when it says no, other/b's
        client gets a 404 and library/a's still gets every byte.
        """
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        data, digest = blob(4096, b"join")
        first = rig.client(f"/v2/library/a/blobs/{digest}")
        upstream = FedBody(200, {b"Content-Length": [b"4096"]})
        rig.upstream.answer(0, upstream)
        upstream.feed(data[:1000])
        other = rig.client(f"/v2/other/b/blobs/{digest}")
        self.assertEqual([(n, d) for n, d, _ in rig.upstream.heads], [("other/b", digest)])
        rig.upstream.heads[0][2].errback(UpstreamNotFound("blob"))
        self.assertEqual(other.status(), 404)
        upstream.feed(data[1000:])
        upstream.end()
        self.assertTrue(first.body().endswith(data))
        self.assertEqual(len(rig.upstream.calls), 1)

    def test_a_blob_fetched_for_a_repository_is_linked_when_it_lands(self):
        """
        A blob downloaded for library/a is served to library/a again with
        no upstream call, and its links file names library/a; a joiner
        confirmed meanwhile is linked too.
        """
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        data, digest = blob(4096, b"land")
        first = rig.client(f"/v2/library/a/blobs/{digest}")
        upstream = FedBody(200, {b"Content-Length": [b"4096"]})
        rig.upstream.answer(0, upstream)
        joiner = rig.client(f"/v2/other/b/blobs/{digest}")
        rig.upstream.heads[0][2].callback(4096)
        upstream.feed(data)
        upstream.end()
        self.assertEqual((first.status(), joiner.status()), (200, 200))
        again = rig.client(f"/v2/library/a/blobs/{digest}")
        self.assertEqual((again.status(), again.header("X-Cache")), (200, "hit"))
        self.assertEqual(len(rig.upstream.heads), 1)
        self.assertEqual(links.read(os.path.join(rig.root, "links", "sha256", digest.hex[:2], digest.hex)),
                         [("docker.io", "library/a"), ("docker.io", "other/b")])


class DurabilityTests(SynchronousTestCase):
    def test_links_survive_a_restart(self):
        """
        After a restart on the same storage, a confirmed link is still
        known: before the start-up index is loaded (read from its file) and
        after (from memory), with no HEAD upstream either way.
        """
        pulled = Pulled(self)
        rig = pulled.rig
        rig.hub.add_image(pulled.image, repo="ci/copy")
        path = f"/v2/ci/copy/blobs/{pulled.layer}"
        self.assertEqual(rig.get(path).status(), 200)
        self.assertEqual(len(heads(rig, path)), 1)

        again = HubRig(credentials=Credentials("ci", "s3cret"), root=rig.root)
        again.hub.add_image(pulled.image, repo="ci/copy")
        self.assertFalse(again.store.index.ready)
        self.assertEqual(again.get(path).status(), 200)
        expiry = Expiry(again.store, None, again.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        self.assertTrue(again.store.index.ready)
        self.assertTrue(again.store.index.links.has(Digest.parse(pulled.layer), ("docker.io", "ci/copy")))
        self.assertEqual(again.get(path).status(), 200)
        self.assertEqual(again.get(f"/v2/ci/private/manifests/{pulled.image.digest}",
                                   headers={"Accept": ALL}).status(), 200)
        self.assertEqual(len(again.hub.requests), 0)

    def test_unlinked_content_from_before_links_is_confirmed_on_first_use(self):
        """
        Content cached before links existed (no links files) is served by
        a tag of its repository with no confirmation, and by digest alone
        after one HEAD: the migration is to confirm on first use.
        """
        pulled = Pulled(self)
        rig = pulled.rig
        shutil.rmtree(os.path.join(rig.root, "links"))
        again = HubRig(credentials=Credentials("ci", "s3cret"), root=rig.root)
        expiry = Expiry(again.store, None, again.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        path = f"/v2/ci/private/blobs/{pulled.layer}"
        self.assertEqual(again.get(path).status(), 200)
        self.assertEqual(len(heads(again, path)), 1)
        self.assertEqual(again.get("/v2/ci/private/manifests/1", headers={"Accept": ALL}).status(), 200)
        self.assertEqual(again.get(f"/v2/ci/private/manifests/{pulled.image.digest}",
                                   headers={"Accept": ALL}).status(), 200)
        self.assertEqual(heads(again, f"/v2/ci/private/manifests/{pulled.image.digest}"), [])
        self.assertEqual(again.stats()["manifest_gets_total"], 0)


class LinksTableTests(SynchronousTestCase):
    def test_parse_skips_what_is_not_a_whole_link(self):
        """A line cut short by a crash, or garbage, is skipped; each link counts once, newest last."""
        data = (b"docker.io library/a\nghcr docker.io x\n127.0.0.1:5000 library/b\n\xff x/y\n"
                b"docker.io library/a\ndocker.io lib")
        self.assertEqual(links.parse(data), [("127.0.0.1:5000", "library/b"), ("docker.io", "library/a")])

    def test_links_per_digest_are_capped_oldest_first(self):
        """
        Past the cap the oldest link is dropped from the file (rewritten
        without it), so the disk stays bounded; a link the file holds
        already is not written twice.
        """
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        self.patch(links, "CAP", 3)
        data, digest = blob(100, b"capped")
        w = rig.store.new_writer(digest)
        w.write(data)
        w.commit()
        w.close()
        for name in ("a/one", "a/two", "a/three"):
            rig.store.link(digest, ("docker.io", name))
        rig.store.index.links.drop(digest)
        rig.store.link(digest, ("docker.io", "a/one"))
        rig.store.link(digest, ("docker.io", "a/four"))
        expected = [("docker.io", "a/two"), ("docker.io", "a/three"), ("docker.io", "a/four")]
        path = os.path.join(rig.root, "links", "sha256", digest.hex[:2], digest.hex)
        self.assertEqual(links.read(path), expected)

    def test_no_link_for_content_not_stored(self):
        """A link to a digest the store does not hold is not kept: links never outlive content."""
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        Expiry(rig.store, None, rig.reactor).startService()
        _, digest = blob(100, b"absent")
        rig.store.link(digest, ("docker.io", "a/one"))
        self.assertFalse(rig.store.index.links.has(digest, ("docker.io", "a/one")))
        self.assertFalse(os.path.exists(os.path.join(rig.root, "links", "sha256", digest.hex[:2], digest.hex)))

    def test_eviction_waits_for_link_writes_and_removes_them(self):
        """
        An eviction chosen while a link write is still under way deletes
        the links file after that write, with the data: nothing is left.
        """
        from tests.test_expiry import Deferring

        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        data, digest = blob(100, b"evicted")
        w = rig.store.new_writer(digest)
        w.write(data)
        w.commit()
        w.close()
        runner = Deferring()
        rig.store._run = runner
        rig.store.link(digest, ("docker.io", "a/one"))
        entry = rig.store.index.get(digest)
        rig.store.index.remove(digest)
        deleted = rig.store.delete([(digest, entry)])
        # Newest first: a deletion that did not wait would run before the write.
        while runner.calls:
            runner.run(len(runner.calls) - 1)
        self.assertEqual(self.successResultOf(deleted), None)
        self.assertEqual(os.listdir(os.path.join(rig.root, "links")), ["sha256"])
        self.assertEqual([f for _, _, fs in os.walk(os.path.join(rig.root, "links")) for f in fs], [])
        self.assertIsNone(rig.blob_file(digest))
        self.assertFalse(rig.store.index.links.has(digest, ("docker.io", "a/one")))


class DeferredHead(SynchronousTestCase):
    """The hand-fed upstream's HEAD is a Deferred the test answers: confirmation waits for it."""

    def test_confirmation_waits_for_upstream(self):
        """Until upstream answers the HEAD, an unlinked cached blob is not served."""
        rig = Rig()
        self.addCleanup(shutil.rmtree, rig.root, True)
        data, digest = blob(100, b"wait")
        w = rig.store.new_writer(digest)
        w.write(data)
        w.commit()
        w.close()
        c = rig.client(f"/v2/library/a/blobs/{digest}")
        self.assertEqual(c.raw(), b"")
        self.assertIsInstance(rig.upstream.heads[0][2], Deferred)
        rig.upstream.heads[0][2].callback(100)
        self.assertEqual(c.body(), data)
