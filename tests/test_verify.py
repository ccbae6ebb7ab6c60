# test-case-name: tests.test_verify
"""
``regcache verify``: a full rehash that finds and removes what rotted, and
says so in its exit status.
"""

import io
import json
import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from regcache import links, verify as verify_module
from regcache.verify import main
from tests.integration.procs import REPO
from tests.support import Rig, blob
from tests.test_expiry import OCI_MANIFEST, cache_blob, manifest_of


class VerifyTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.addCleanup(shutil.rmtree, self.rig.root, True)
        self.store = self.rig.store
        self.layer = blob(300_000, b"layer")
        cache_blob(self.store, *self.layer)
        self.manifest = manifest_of(OCI_MANIFEST, layers=[(self.layer[1], 300_000)])
        self.store.put_manifest(self.manifest)
        tag_dir = os.path.join(self.rig.root, "tags", "up", "library", "a", "_tags", "1")
        os.makedirs(tag_dir)
        self.tag = os.path.join(tag_dir, "k.json")
        with open(self.tag, "w") as f:
            json.dump({"digest": str(self.manifest.digest), "media_type": OCI_MANIFEST,
                       "size": self.manifest.size, "checked": 0}, f)

    def verify(self):
        out = io.StringIO()
        return main(["--storage", self.rig.root], environ={}, out=out), out.getvalue()

    def corrupt(self, digest):
        path = self.store.blob_path(digest)
        with open(path, "r+b") as f:
            f.seek(10)
            f.write(b"\xff\xfe")

    def test_clean_store_exits_zero(self):
        """A store where every file matches its name passes and keeps everything."""
        code, out = self.verify()
        self.assertEqual(code, 0, out)
        self.assertIn("checked 2 files", out)
        self.assertTrue(os.path.exists(self.tag))

    def test_corrupt_blob_is_reported_and_removed(self):
        """A flipped byte in a layer is found, the file removed, and the exit status is 1."""
        self.corrupt(self.layer[1])
        code, out = self.verify()
        self.assertEqual(code, 1)
        self.assertIn(f"corrupt: {self.layer[1]}", out)
        self.assertFalse(os.path.exists(self.store.blob_path(self.layer[1])))
        self.assertEqual(self.verify()[0], 0)

    def test_corrupt_manifest_takes_its_record_and_tags(self):
        """
        A corrupt manifest goes with its type record and every tag entry
        that names it; other files stay.
        """
        self.corrupt(self.manifest.digest)
        code, out = self.verify()
        self.assertEqual(code, 1, out)
        self.assertFalse(os.path.exists(self.store.blob_path(self.manifest.digest)))
        self.assertFalse(os.path.exists(self.store._path("manifests", self.manifest.digest)))
        self.assertFalse(os.path.exists(self.tag))
        self.assertTrue(os.path.exists(self.store.blob_path(self.layer[1])))

    def test_good_copy_stored_meanwhile_is_kept(self):
        """
        Beside a live server: a corrupt manifest that the server stored
        again after verify read the bad bytes keeps its new body and its
        type record; only the bad file would have been removed.
        """
        self.corrupt(self.manifest.digest)
        real = verify_module.hash_file

        def hash_then_store_again(path, digest):
            result = real(path, digest)
            if digest == self.manifest.digest:
                self.store._write_manifest(self.manifest)
            return result

        self.patch(verify_module, "hash_file", hash_then_store_again)
        code, out = self.verify()
        self.assertEqual(code, 1, out)
        self.assertIn(f"corrupt: {self.manifest.digest}", out)
        self.assertEqual(self.rig.blob_file(self.manifest.digest), self.manifest.body)
        self.assertTrue(os.path.exists(self.store._path("manifests", self.manifest.digest)))

    def test_strays_and_orphan_records(self):
        """A file that is no digest and a type record without a body are problems too."""
        stray = os.path.join(self.rig.root, "blobs", "sha256", "zz", "junk")
        os.makedirs(os.path.dirname(stray))
        open(stray, "w").close()
        os.unlink(self.store.blob_path(self.manifest.digest))
        code, out = self.verify()
        self.assertEqual(code, 1)
        self.assertFalse(os.path.exists(stray))
        self.assertFalse(os.path.exists(self.store._path("manifests", self.manifest.digest)))

    def links_file(self, digest):
        return os.path.join(self.rig.root, "links", digest.algorithm, digest.hex[:2], digest.hex)

    def test_links_of_good_content_are_kept(self):
        """
        Verify keeps every link of content that matches its digest: a
        restart after it serves the repositories it served before.
        """
        key = ("docker.io", "library/a")
        self.store.link(self.layer[1], key)
        self.store.link(self.manifest.digest, key)
        code, out = self.verify()
        self.assertEqual(code, 0, out)
        self.assertEqual(links.read(self.links_file(self.layer[1])), [key])
        self.assertEqual(links.read(self.links_file(self.manifest.digest)), [key])

    def test_links_go_with_corrupt_content_and_without_content(self):
        """
        A corrupt blob's links are removed with it, and so are links whose
        content is gone (removed by hand), reported as a problem; a stray
        file under links/ too.
        """
        key = ("docker.io", "library/a")
        self.store.link(self.layer[1], key)
        self.store.link(self.manifest.digest, key)
        self.corrupt(self.layer[1])
        os.unlink(self.store.blob_path(self.manifest.digest))
        stray = os.path.join(self.rig.root, "links", "sha256", "zz", "junk")
        os.makedirs(os.path.dirname(stray))
        open(stray, "w").close()
        code, out = self.verify()
        self.assertEqual(code, 1)
        self.assertFalse(os.path.exists(self.links_file(self.layer[1])))
        self.assertFalse(os.path.exists(self.links_file(self.manifest.digest)))
        self.assertFalse(os.path.exists(stray))
        self.assertIn(f"links without content: {self.links_file(self.manifest.digest)}", out)
        self.assertIn("1 orphan links files", out)
        self.assertEqual(self.verify()[0], 0)

    def test_no_store_is_an_error(self):
        """A directory that holds no store is exit status 2, not a clean pass."""
        out = io.StringIO()
        self.assertEqual(main(["--storage", os.path.join(self.rig.root, "nope")], environ={}, out=out), 2)

    def test_console_command(self):
        """``regcache verify`` dispatches to the check (through ``python -m regcache``)."""
        self.corrupt(self.layer[1])
        env = dict(os.environ, PYTHONPATH=REPO)
        done = subprocess.run([sys.executable, "-m", "regcache", "verify", "--storage", self.rig.root],
                              capture_output=True, text=True, env=env)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertIn("1 corrupt", done.stdout)
