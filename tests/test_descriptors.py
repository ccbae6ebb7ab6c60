# test-case-name: tests.test_descriptors
"""
Every descriptor a blob response opens is closed when the response ends,
however it ends: served, refused, cut short by the client, or aborted by a
failed download.  The same battery runs against a real process in
tests/integration/test_descriptors_proc.py.
"""

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.support import FedBody, Rig, blob

HUGE = "9" * 4400

#: Range values that refuse, clip, ignore or break the parser.
HOSTILE_RANGES = [
    f"bytes={HUGE}-", f"bytes=0-{HUGE}", f"bytes=-{HUGE}", f"bytes={HUGE}-{HUGE}",
    "bytes=5-3", "bytes=500-0", "bytes=-0", "bytes=5000-", "bytes=abc", "bytes=--1",
    "bytes=0-1,5-9", "items=0-1", "bytes=\xff-1", "bytes=1000-1499", "bytes=2047-",
]


def descriptors(pid="self"):
    """What a process's open descriptors point at: paths, ``socket:[inode]``, ``pipe:[...]``."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


def open_under(root: str):
    """This process's descriptors that point at a file under ``root``."""
    return [t for t in descriptors() if t.startswith(root)]


class DescriptorTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.data, self.digest = blob(2048, b"descriptors")
        self.path = f"/v2/library/a/blobs/{self.digest}"

    def assertNothingOpen(self):
        self.assertEqual(open_under(self.rig.root), [])
        self.assertEqual(self.rig.store.index.pins, {})

    def battery(self):
        clients = []
        for value in HOSTILE_RANGES:
            for method in ("GET", "HEAD"):
                clients.append(self.rig.client(self.path, method, {"Range": value}))
        clients.append(self.rig.client(self.path))
        clients.append(self.rig.client(self.path, "HEAD"))
        return clients

    def start_fill(self):
        first = self.rig.client(self.path)
        body = FedBody(200, {b"Content-Length": [b"2048"]})
        self.rig.upstream.answer(len(self.rig.upstream.calls) - 1, body)
        return first, body

    def test_cached_blob(self):
        """Hostile and ordinary requests for a cached blob leave no descriptor open."""
        first, body = self.start_fill()
        body.feed(self.data)
        body.end()
        self.assertEqual(first.body(), self.data)
        for c in self.battery():
            self.assertIn(c.status(), (200, 206, 416))
        self.assertNothingOpen()

    def test_blob_being_downloaded(self):
        """
        The battery while the blob is half downloaded, with some clients
        hanging up while they wait for bytes, leaves no descriptor open once
        the download lands.
        """
        first, body = self.start_fill()
        body.feed(self.data[:1000])
        clients = self.battery()
        for c in clients[::3]:
            c.hang_up()
        body.feed(self.data[1000:])
        body.end()
        self.assertEqual(first.body(), self.data)
        self.assertNothingOpen()

    def test_failed_download(self):
        """
        A download that fails its digest check aborts its clients and
        leaves no descriptor open.
        """
        first, body = self.start_fill()
        body.feed(self.data[:1000])
        clients = self.battery()
        body.feed(bytes(2048 - 1000))
        body.end()
        self.assertTrue(first.aborted())
        self.assertNothingOpen()


class OutOfDescriptorsTests(SynchronousTestCase):
    """
    A cached blob the process cannot open for want of descriptors (or for
    any reason but its absence) is answered 503 and stays cached: only a
    missing file means a missing blob.
    """

    def setUp(self):
        self.rig = Rig()
        self.data, self.digest = blob(2048, b"emfile")
        self.path = f"/v2/library/a/blobs/{self.digest}"

    def cache_it(self):
        first = self.rig.client(self.path)
        body = FedBody(200, {b"Content-Length": [b"2048"]})
        self.rig.upstream.answer(0, body)
        body.feed(self.data)
        body.end()
        self.assertEqual(first.body(), self.data)

    def refuse(self, name, code):
        """Make ``os.<name>`` fail with ``code`` in the store for this test."""
        import errno

        import regcache.store

        def refused(*args, **kwargs):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

        self.unpatch = self.patch(regcache.store.os, name, refused).restore

    def assertUnavailable(self, c, method="GET"):
        self.assertEqual(c.status(), 503)
        if method == "GET":
            error = json.loads(c.body())["errors"][0]
            self.assertEqual(error["code"], "UNAVAILABLE")
            self.assertIn("open", error["message"])

    def test_cached_blob_kept_when_open_fails(self):
        """
        EMFILE, ENFILE, EACCES and EIO on a cached blob answer GET and HEAD
        with 503 and a counted lookup; the entry stays, and once descriptors
        are back it is served from the cache with no new upstream request.
        """
        self.cache_it()
        for code in ("EMFILE", "ENFILE", "EACCES", "EIO"):
            with self.subTest(code=code):
                self.refuse("open", code)
                for method in ("GET", "HEAD"):
                    self.assertUnavailable(self.rig.client(self.path, method), method)
                self.assertIn(self.digest, self.rig.store.index)
                self.assertEqual(len(self.rig.upstream.calls), 1)
                self.assertEqual(len(self.rig.upstream.heads), 0)
                self.unpatch()
        self.assertEqual(self.rig.metrics.cache.labels("blob", "unreadable")._value.get(), 8)
        again = self.rig.client(self.path)
        self.assertEqual(again.body(), self.data)
        self.assertEqual(len(self.rig.upstream.calls), 1)
        self.assertEqual(open_under(self.rig.root), [])

    def test_joining_a_download_without_descriptors(self):
        """
        A client that joins a download when no descriptor is left for it
        gets 503; the download and its first client go on unharmed.
        """
        first = self.rig.client(self.path)
        body = FedBody(200, {b"Content-Length": [b"2048"]})
        self.rig.upstream.answer(0, body)
        body.feed(self.data[:1000])
        self.refuse("dup", "EMFILE")
        self.assertUnavailable(self.rig.client(self.path))
        self.unpatch()
        body.feed(self.data[1000:])
        body.end()
        self.assertEqual(first.body(), self.data)
        self.assertIn(self.digest, self.rig.store.index)
        self.assertEqual(open_under(self.rig.root), [])

    def test_cached_manifest_kept_when_reading_fails(self):
        """
        A cached manifest the runner cannot open (EMFILE) answers 503 and
        stays cached: once descriptors are back it is served with no
        upstream request.
        """
        import errno

        import regcache.store
        from tests.support import HubRig

        rig = HubRig()
        digest = rig.images["library/small:1"].digest
        path = f"/v2/library/small/manifests/{digest}"
        self.assertEqual(rig.get(path).status(), 200)
        gets = rig.stats()["manifest_gets_total"]
        rig.store._manifests.clear()

        def refused(*args, **kwargs):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        regcache.store.open = refused
        try:
            self.assertUnavailable(rig.get(path))
        finally:
            del regcache.store.open
        self.assertEqual(rig.get(path).status(), 200)
        self.assertEqual(rig.stats()["manifest_gets_total"], gets)
