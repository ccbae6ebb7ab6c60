# test-case-name: tests.test_tags
"""
Tags through the whole mirror: what a tag entry is keyed by, what it holds,
where its disk work runs, and what a client is told about a tag.

Most tests drive HTTP requests into the real Site in front of the in-memory
fake Hub (HubRig); the TagMap ones drive the map directly with a thread
runner that holds every job until the test runs it (test_expiry's
Deferring), so disk work done anywhere but in the runner shows at once.
"""

import json
import os
import shutil
import tempfile

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from regcache.index import Index
from regcache.manifests import MANIFEST_MEDIA_TYPES
from regcache.tags import TOUCH_EVERY, TagEntry, TagKey, TagMap, accept_key, accepted
from tests.support import HubRig, inline
from tests.test_expiry import Deferring

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ALL = ", ".join([SCHEMA2, LIST, OCI, OCI_INDEX])
DIGEST = "sha256:" + "a" * 64


class TempDirs:
    def tempdir(self):
        path = tempfile.mkdtemp(prefix="regcache-tags-")
        self.addCleanup(shutil.rmtree, path, True)
        return path


def code(client):
    return json.loads(client.body())["errors"][0]["code"]


def message(client):
    return json.loads(client.body())["errors"][0]["message"]


def tag_files(root):
    """Every file under the store's tags/ directory."""
    return [os.path.join(d, n) for d, _, names in os.walk(os.path.join(root, "tags")) for n in names]


def disk_bytes(root):
    """
    What tags/ takes below its own directory, counted as a filesystem
    allocates: a 4 KiB block at least per file and per directory.
    """
    total = 0
    for d, dirs, names in os.walk(os.path.join(root, "tags")):
        total += 4096 * len(dirs)
        for n in names:
            total += max(1, -(-os.path.getsize(os.path.join(d, n)) // 4096)) * 4096
    return total


class Lying:
    """
    An upstream HTTP client whose manifest responses carry headers of
    another kind of server (an HTML front end, a proxy that rewrites
    lengths): what the mirror must not pass on to clients.
    """

    def __init__(self, http, method, headers):
        self.http = http
        self.method = method
        self.headers = headers

    def request(self, method, url, **kw):
        d = self.http.request(method, url, **kw)
        if method == self.method and "/manifests/" in url:
            d.addCallback(self._rewrite)
        return d

    def _rewrite(self, response):
        for name, value in self.headers.items():
            response.headers.setRawHeaders(name, [value])
        return response


class AcceptKeyTests(SynchronousTestCase):
    def test_wildcards_and_no_accept_admit_every_manifest_type(self):
        """No Accept, ``*/*`` and ``application/*`` all admit every manifest type regcache serves."""
        for accept in ([], ["*/*"], ["application/*"], ["text/html", "*/*;q=0.1"]):
            self.assertEqual(accepted(accept), MANIFEST_MEDIA_TYPES, accept)

    def test_only_known_manifest_types_count(self):
        """What a client lists beyond the known manifest types changes nothing; case does not matter."""
        self.assertEqual(accepted([OCI.upper(), "application/json", "x/" + "y" * 500]), (OCI,))
        self.assertEqual(accepted(["text/html", "application/json"]), ())
        self.assertEqual(accept_key(accepted([SCHEMA2, LIST, "a/b"])), accept_key(accepted([LIST, SCHEMA2])))
        self.assertNotEqual(accept_key(accepted([SCHEMA2])), accept_key(accepted([SCHEMA2, LIST])))


class BoundedStateTests(TempDirs, SynchronousTestCase):
    def test_missing_tags_leave_nothing_behind(self):
        """Tags upstream does not have leave no entry in memory and no file: misses are not remembered."""
        rig = HubRig()
        for i in range(200):
            c = rig.get(f"/v2/library/small/manifests/missing-{i}", headers={"Accept": ALL})
            self.assertEqual(c.status(), 404)
        self.assertEqual(len(rig.mirror.tags), 0)
        self.assertEqual(tag_files(rig.root), [])

    def test_distinct_accept_values_share_one_entry(self):
        """
        300 HEADs of one tag, each with an Accept value of its own beyond
        the same manifest types, cost one upstream HEAD and one tag file.
        """
        rig = HubRig()
        for i in range(300):
            c = rig.get("/v2/library/small/manifests/1", "HEAD", headers={"Accept": f"{ALL}, application/x-{i}"})
            self.assertEqual(c.status(), 200)
        self.assertEqual(rig.stats()["manifest_heads_total"], 1)
        self.assertEqual(len(tag_files(rig.root)), 1)

    def test_keys_per_tag_are_bounded_by_the_manifest_types(self):
        """Every subset of the known types in turn makes at most one key each: 63 at most for a tag."""
        rig = HubRig()
        for mask in range(1, 2 ** len(MANIFEST_MEDIA_TYPES)):
            for junk in range(3):
                types = [t for i, t in enumerate(MANIFEST_MEDIA_TYPES) if mask & (1 << i)]
                rig.get("/v2/library/small/manifests/1", "HEAD",
                        headers={"Accept": ", ".join(types + [f"x/{junk}"])})
        self.assertLessEqual(len(tag_files(rig.root)), 63)
        self.assertLessEqual(rig.stats()["manifest_heads_total"], 63)

    def test_memory_keeps_the_most_recently_used_entries(self):
        """Past its bound the in-memory map drops the least recently used entry, not the one just read."""
        root = self.tempdir()
        os.makedirs(os.path.join(root, "tmp"))
        tags = TagMap(root, inline, Index(lambda: 0.0), memory=10)
        keys = [TagKey("up", "library/a", f"t{i}", accept_key(MANIFEST_MEDIA_TYPES)) for i in range(12)]
        for i, key in enumerate(keys[:10]):
            tags.put(key, TagEntry(DIGEST, OCI, 10, float(i)))
        self.successResultOf(tags.get(keys[0]))
        tags.put(keys[10], TagEntry(DIGEST, OCI, 10, 10.0))
        tags.put(keys[11], TagEntry(DIGEST, OCI, 10, 11.0))
        self.assertEqual(len(tags), 10)
        self.assertIn(keys[0], tags)
        self.assertNotIn(keys[1], tags)
        self.assertNotIn(keys[2], tags)
        # Dropped from memory is not lost: the file still has it.
        self.assertEqual(self.successResultOf(tags.get(keys[1])).checked, 1.0)


class TagBytesTests(TempDirs, SynchronousTestCase):
    def test_tag_files_never_evict_content(self):
        """
        With a size limit smaller than what 63 Accept sets of three tags
        write, the pulled image's manifest and layer stay cached: tag
        files have their own bound and do not count toward --max-size.
        """
        from itertools import combinations

        from regcache.expiry import Expiry

        rig = HubRig()
        expiry = Expiry(rig.store, 400 * 1024, rig.reactor)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        image = rig.images["library/small:1"]
        self.assertEqual(rig.get("/v2/library/small/manifests/1", headers={"Accept": ALL}).status(), 200)
        layer = image.layers[0].digest
        self.assertEqual(rig.get(f"/v2/library/small/blobs/{layer}").status(), 200)
        held = set(rig.store.index.digests())
        subsets = [c for n in range(1, 7) for c in combinations(MANIFEST_MEDIA_TYPES, n)]
        self.assertEqual(len(subsets), 63)
        for name in ("small", "multi", "large"):
            for types in subsets:
                rig.get(f"/v2/library/{name}/manifests/1", "HEAD", headers={"Accept": ", ".join(types)})
        rig.reactor.advance(60)
        self.assertGreater(disk_bytes(rig.root), 400 * 1024)
        self.assertEqual(set(rig.store.index.digests()), held)
        self.assertEqual(rig.get(f"/v2/library/small/blobs/{layer}").status(), 200)

    def test_tag_files_are_bounded_least_recently_used_out(self):
        """
        Past their bound (a twentieth of the size limit, 1 MiB at least)
        tag files are deleted least recently used first, in the runner;
        what they take is counted exactly, after writes and at start-up.
        """
        root = self.tempdir()
        for sub in ("tmp", "tags"):
            os.makedirs(os.path.join(root, sub))
        index = Index(lambda: 0.0)
        index.limit = 1024
        tags = TagMap(root, inline, index)
        self.assertEqual(tags.bound(), 1024 * 1024)
        keys = [TagKey("docker.io", f"library/n{i}", "1", "3f") for i in range(400)]
        for i, key in enumerate(keys):
            tags.put(key, TagEntry(DIGEST, OCI, 10, float(i)))
            tags.get(keys[0])  # in use throughout: outlives younger entries
            self.assertLessEqual(tags.bytes, tags.bound())
        self.assertEqual(tags.bytes, disk_bytes(root))
        on_disk = {os.path.relpath(p, root) for p in tag_files(root)}
        self.assertIn(os.path.relpath(tags._path(keys[0]), root), on_disk)
        self.assertNotIn(os.path.relpath(tags._path(keys[1]), root), on_disk)
        self.assertIn(os.path.relpath(tags._path(keys[-1]), root), on_disk)

        again = TagMap(root, inline, Index(lambda: 0.0))
        self.successResultOf(again.count())
        self.assertEqual(again.bytes, disk_bytes(root))

    def test_unlimited_store_has_a_fixed_tag_bound(self):
        """Without --max-size, tag files are still bounded, by TAG_BOUND."""
        from regcache.tags import TAG_BOUND

        tags = TagMap(self.tempdir(), inline, Index(lambda: 0.0))
        self.assertEqual(tags.bound(), TAG_BOUND)

    def test_start_up_removes_entries_of_an_older_layout(self):
        """
        Entry files not named by an accept key of this version (as the raw
        Accept hash of old ones was) are removed at start and not counted:
        they could never be read again.
        """
        root = self.tempdir()
        os.makedirs(os.path.join(root, "tmp"))
        old = os.path.join(root, "tags", "docker.io", "library", "a", "_tags", "1")
        os.makedirs(old)
        for i in range(5):
            with open(os.path.join(old, f"{i:016x}.json"), "w") as f:
                json.dump({"digest": DIGEST, "media_type": OCI, "size": 1, "checked": 0.0}, f)
        index = Index(lambda: 0.0)
        tags = TagMap(root, inline, index)
        key = TagKey("docker.io", "library/a", "1", accept_key(MANIFEST_MEDIA_TYPES))
        tags.put(key, TagEntry(DIGEST, OCI, 10, 1.0))
        self.successResultOf(TagMap(root, inline, index).count())
        self.assertEqual(sorted(os.listdir(old)), [key.accept + ".json"])


class OffTheReactorTests(TempDirs, SynchronousTestCase):
    def setUp(self):
        self.root = self.tempdir()
        os.makedirs(os.path.join(self.root, "tmp"))
        self.runner = Deferring()
        self.tags = TagMap(self.root, self.runner, Index(lambda: 0.0), memory=2)
        self.key = TagKey("up", "library/a", "1", accept_key((OCI,)))

    def test_reads_wait_for_the_runner(self):
        """A tag not in memory is read by the runner: get and siblings answer only once it ran."""
        d = self.tags.get(self.key)
        s = self.tags.siblings(self.key)
        self.assertNoResult(d)
        self.assertNoResult(s)
        self.runner.run_all()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.successResultOf(s), [])

    def test_writes_go_to_the_runner_and_are_served_meanwhile(self):
        """
        A put is on disk only once the runner ran it, and is served from
        memory meanwhile, to get and to siblings, even for a key that left
        the memory bound before its write landed.
        """
        self.tags.put(self.key, TagEntry(DIGEST, OCI, 10, 1.0))
        others = [TagKey("up", "library/a", "1", accept_key(types)) for types in ((SCHEMA2,), (SCHEMA2, LIST), (LIST,))]
        for checked, key in enumerate(others, start=2):
            self.tags.put(key, TagEntry(DIGEST, SCHEMA2, 20, float(checked)))
        self.assertEqual(tag_files(self.root), [])
        self.assertNotIn(self.key, self.tags)
        self.assertEqual(self.successResultOf(self.tags.get(self.key)).size, 10)
        siblings = self.tags.siblings(others[0])
        self.runner.run(-1)
        self.assertEqual([e.checked for e in self.successResultOf(siblings)], [4.0, 3.0, 1.0])
        self.runner.run_all()
        self.assertEqual(len(tag_files(self.root)), 4)

    def test_writes_of_one_entry_land_in_order(self):
        """Two puts of one entry in quick succession leave the newer one on disk, whatever the runner does."""
        self.tags.put(self.key, TagEntry(DIGEST, OCI, 10, 1.0))
        self.tags.put(self.key, TagEntry(DIGEST, OCI, 20, 2.0))
        # Run the jobs newest first, as a pool of threads may.
        self.runner.calls.reverse()
        self.runner.run_all()
        [path] = tag_files(self.root)
        with open(path) as f:
            self.assertEqual(json.load(f)["size"], 20)

    def test_a_failed_write_keeps_the_entry_in_memory(self):
        """An entry the disk refused is still served from memory: it is a hint."""
        tags = TagMap(self.root, lambda f, *a: fail(OSError(28, "No space left on device")), Index(lambda: 0.0))
        tags.put(self.key, TagEntry(DIGEST, OCI, 10, 1.0))
        self.assertEqual(self.successResultOf(tags.get(self.key)).size, 10)


class ConcurrentCheckTests(SynchronousTestCase):
    def test_a_check_that_finished_meanwhile_is_not_repeated(self):
        """
        Two clients asking for a cold tag at once cost one upstream HEAD,
        even when the second learns it has no entry only after the first
        one's check has finished.
        """
        rig = HubRig()
        runner = Deferring()
        rig.mirror.tags = TagMap(rig.root, runner, rig.store.index)
        path = "/v2/library/small/manifests/1"
        first = rig.client(path, "HEAD", headers={"Accept": ALL})
        second = rig.client(path, "HEAD", headers={"Accept": ALL})
        runner.run_all()
        rig.settle()
        runner.run_all()
        rig.settle()
        self.assertEqual((first.status(), second.status()), (200, 200))
        self.assertEqual(rig.stats()["manifest_heads_total"], 1)


class RevalidationWriteTests(SynchronousTestCase):
    def test_unchanged_tag_is_not_rewritten_at_every_revalidation(self):
        """
        Revalidations that find the tag unchanged leave its file alone
        until TOUCH_EVERY has passed since it was written; the next one
        then records the newer check.
        """
        rig = HubRig(tag_ttl=60)
        path = "/v2/library/small/manifests/1"
        self.assertEqual(rig.get(path, headers={"Accept": ALL}).status(), 200)
        [tag_file] = tag_files(rig.root)
        st = os.stat(tag_file)
        written = (st.st_ino, st.st_mtime_ns, open(tag_file, "rb").read())
        checks = int(TOUCH_EVERY // 61)
        for _ in range(checks):
            rig.reactor.advance(61)
            self.assertEqual(rig.get(path, headers={"Accept": ALL}).status(), 200)
        st = os.stat(tag_file)
        self.assertEqual((st.st_ino, st.st_mtime_ns, open(tag_file, "rb").read()), written)
        self.assertEqual(rig.stats()["manifest_heads_total"], 1 + checks)
        rig.reactor.advance(61)
        rig.get(path, headers={"Accept": ALL})
        with open(tag_file) as f:
            self.assertEqual(json.load(f)["checked"], rig.reactor.seconds())


class HeadTruthTests(SynchronousTestCase):
    path = "/v2/library/small/manifests/1"

    def rig(self, method, headers):
        rig = HubRig(tag_ttl=60)
        rig.upstream.http = Lying(rig.treq, method, headers)
        return rig, rig.images["library/small:1"]

    def assertTrue_(self, c, image):
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Content-Length"), str(image.size))
        self.assertEqual(c.header("Content-Type"), image.media_type)
        self.assertEqual(c.header("Docker-Content-Digest"), image.digest)

    def test_head_after_a_get_answers_with_the_manifest(self):
        """
        Once a GET stored the manifest, a HEAD by tag answers with its real
        size and type, not what upstream's HEAD claimed, in the window and
        after a revalidation.
        """
        rig, image = self.rig("HEAD", {b"content-length": b"999999", b"content-type": b"text/html"})
        self.assertTrue_(rig.get(self.path, headers={"Accept": ALL}), image)
        self.assertTrue_(rig.get(self.path, "HEAD", headers={"Accept": ALL}), image)
        rig.reactor.advance(61)
        self.assertTrue_(rig.get(self.path, "HEAD", headers={"Accept": ALL}), image)

    def test_wrong_size_gives_way_once_the_manifest_is_held(self):
        """
        A plausible but wrong size from upstream's HEAD is replaced by the
        manifest's own as soon as regcache holds it (here from a GET by
        digest, as dockerd pulls).
        """
        rig, image = self.rig("HEAD", {b"content-length": b"999999"})
        rig.get(self.path, "HEAD", headers={"Accept": ALL})
        self.assertEqual(rig.get(f"/v2/library/small/manifests/{image.digest}").status(), 200)
        self.assertTrue_(rig.get(self.path, "HEAD", headers={"Accept": ALL}), image)

    def test_a_type_that_is_no_manifest_type_is_never_relayed(self):
        """
        A HEAD-only client of a tag never held is not told upstream's
        text/html: regcache fetches the manifest by digest and answers with
        what it verified.
        """
        rig, image = self.rig("HEAD", {b"content-length": b"999999", b"content-type": b"text/html"})
        self.assertTrue_(rig.get(self.path, "HEAD", headers={"Accept": ALL}), image)

    def test_get_with_a_non_manifest_content_type_is_served_as_its_body_says(self):
        """A manifest GET upstream answered as text/html is served with the media type its body declares."""
        rig, image = self.rig("GET", {b"content-type": b"text/html"})
        c = rig.get(self.path, headers={"Accept": ALL})
        self.assertTrue_(c, image)
        self.assertEqual(c.body(), image.manifest)
        c = rig.get(f"/v2/library/small/manifests/{image.digest}", "HEAD")
        self.assertEqual(c.header("Content-Type"), image.media_type)

    def test_a_malformed_digest_from_upstream_is_upstream_failing(self):
        """
        A Docker-Content-Digest upstream sent that is no digest is upstream's
        fault, told in words, and not the client's bad digest.
        """
        rig, image = self.rig("HEAD", {b"docker-content-digest": b"sha256:../../etc"})
        c = rig.get(self.path, headers={"Accept": ALL})
        self.assertEqual(c.status(), 503)
        [error] = json.loads(c.body())["errors"]
        self.assertEqual(error["code"], "UNAVAILABLE")
        self.assertIn("sent a malformed Docker-Content-Digest", error["message"])

    def test_every_response_says_nosniff(self):
        """Every answer, error or not, carries X-Content-Type-Options: nosniff."""
        rig = HubRig()
        for method, path in [("GET", "/"), ("GET", "/v2/"), ("GET", "/metrics"), ("HEAD", self.path),
                             ("GET", "/v2/library/small/manifests/nope"), ("PUT", self.path),
                             ("GET", "/nothing/here"), ("BREW", "/v2/")]:
            c = rig.get(path, method, headers={"Accept": ALL})
            self.assertEqual(c.header("X-Content-Type-Options"), "nosniff", (method, path, c.status()))


class AcceptAnswerTests(SynchronousTestCase):
    path = "/v2/library/multi/manifests/1"

    def test_no_accept_or_wildcard_gets_an_oci_manifest(self):
        """A client sending no Accept, or ``*/*``, is served the OCI manifest a tag names."""
        rig = HubRig()
        image = rig.images["library/multi:1"]
        for method in ("GET", "HEAD"):
            for headers in ({}, {"Accept": "*/*"}):
                c = rig.get(self.path, method, headers=headers)
                self.assertEqual(c.status(), 200, (method, headers))
                self.assertEqual(c.header("Content-Type"), OCI)
                self.assertEqual(c.header("Docker-Content-Digest"), image.digest)

    def test_no_accept_is_served_a_cached_oci_manifest_during_an_outage(self):
        """What dockerd pulled stands in for a client with no Accept while upstream is down."""
        rig = HubRig(tag_ttl=60)
        self.assertEqual(rig.get(self.path, headers={"Accept": ALL}).status(), 200)
        rig.reactor.advance(61)
        rig.hub.fault("status", scope="manifests", status=503)
        c = rig.client(self.path)
        rig.pass_time(3)
        self.assertEqual(c.status(), 200)
        self.assertEqual(c.header("Content-Type"), OCI)

    def test_a_client_accepting_no_manifest_type_is_told_so(self):
        """
        An Accept naming no manifest type regcache serves is a 404 whose
        message says so, with no upstream request.
        """
        rig = HubRig()
        c = rig.get("/v2/library/small/manifests/1", headers={"Accept": "application/json"})
        self.assertEqual((c.status(), code(c)), (404, "MANIFEST_UNKNOWN"))
        self.assertIn("Accept", message(c))
        self.assertEqual(rig.stats()["manifest_heads_total"], 0)

    def test_a_type_the_client_does_not_accept_is_refused_by_name(self):
        """A manifest of a type outside the client's Accept list is refused with a message naming the type."""
        rig = HubRig()
        c = rig.get("/v2/library/small/manifests/1", headers={"Accept": OCI})
        self.assertEqual((c.status(), code(c)), (404, "MANIFEST_UNKNOWN"))
        self.assertIn(SCHEMA2, message(c))
