# test-case-name: tests.test_prefetch
"""
``regcache prefetch`` without a mirror: image references read as docker
reads them, platforms chosen from an index, the report's words, and the
command line's refusals.  tests/integration/test_prefetch_proc.py runs it
against a real regcache.
"""

import contextlib
import hashlib
import http.server
import io
import threading

from twisted.trial.unittest import SynchronousTestCase

from regcache.prefetch import (
    Bar, Failed, ImageRef, MirrorClient, Platform, Tally, blobs_of, main, parse_image, parse_platforms, select,
)

DIGEST = "sha256:" + "a" * 64


def entry(arch, os="linux", variant=None):
    platform = {"os": os, "architecture": arch}
    if variant:
        platform["variant"] = variant
    return {"digest": f"sha256:{arch:a<64}"[:71], "platform": platform}


class ReferenceTests(SynchronousTestCase):
    def test_docker_hub_names(self):
        """One-component Hub names are under library/, a missing tag is latest, Hub's aliases are docker.io."""
        self.assertEqual(parse_image("alpine"), ImageRef("docker.io", "library/alpine", "latest", None))
        self.assertEqual(parse_image("alpine:3.20"), ImageRef("docker.io", "library/alpine", "3.20", None))
        self.assertEqual(parse_image("bitnami/redis:7"), ImageRef("docker.io", "bitnami/redis", "7", None))
        self.assertEqual(parse_image("docker.io/alpine:3.20"), ImageRef("docker.io", "library/alpine", "3.20", None))
        self.assertEqual(parse_image("index.docker.io/library/alpine"),
                         ImageRef("docker.io", "library/alpine", "latest", None))
        self.assertEqual(parse_image("registry-1.docker.io/x/y:1"), ImageRef("docker.io", "x/y", "1", None))

    def test_other_registries(self):
        """A first component with a dot or a port, or localhost, is a registry, and no library/ is added."""
        self.assertEqual(parse_image("ghcr.io/owner/app:v1"), ImageRef("ghcr.io", "owner/app", "v1", None))
        self.assertEqual(parse_image("registry.k8s.io/pause:3.9"), ImageRef("registry.k8s.io", "pause", "3.9", None))
        self.assertEqual(parse_image("localhost:5000/app"), ImageRef("localhost:5000", "app", "latest", None))
        self.assertEqual(parse_image("localhost/app:2"), ImageRef("localhost", "app", "2", None))

    def test_digests(self):
        """A digest is kept with or without a tag, and is what the manifest is asked by."""
        by_digest = parse_image(f"alpine@{DIGEST}")
        self.assertEqual(by_digest, ImageRef("docker.io", "library/alpine", None, DIGEST))
        both = parse_image(f"ghcr.io/o/a:v1@{DIGEST}")
        self.assertEqual(both, ImageRef("ghcr.io", "o/a", "v1", DIGEST))
        self.assertEqual(both.reference, DIGEST)
        self.assertEqual(str(both), f"ghcr.io/o/a:v1@{DIGEST}")
        self.assertEqual(parse_image("alpine:3.20").reference, "3.20")

    def test_bad_references_are_refused_in_words(self):
        """Upper case, a bad tag, a bad or unverifiable digest, an empty name: each a Failed naming the input."""
        for text in ["Alpine", "alpine:", "alpine:-x", "alpine@sha256:abc", f"alpine@md5:{'a' * 32}", "",
                     "ghcr.io/", "a/../b"]:
            with self.assertRaises(Failed, msg=text) as caught:
                parse_image(text)
            self.assertIn(f"{text}:", str(caught.exception))


class PlatformTests(SynchronousTestCase):
    def setUp(self):
        self.index = {"manifests": [entry("amd64"), entry("arm64", variant="v8"), entry("arm", variant="v7"),
                                    entry("unknown", os="unknown")]}

    def test_all_is_every_manifest(self):
        """Without --platform (all), every manifest of the index is fetched, attestations too."""
        self.assertIsNone(parse_platforms("all"))
        self.assertEqual(select(self.index, None), self.index["manifests"])

    def test_chosen_platforms(self):
        """Only the manifests of the platforms named; a platform without a variant matches any variant."""
        chosen = select(self.index, parse_platforms("linux/arm64"))
        self.assertEqual(chosen, [self.index["manifests"][1]])
        chosen = select(self.index, parse_platforms("linux/amd64, linux/arm"))
        self.assertEqual(chosen, [self.index["manifests"][0], self.index["manifests"][2]])

    def test_variants(self):
        """A variant must match; arm64 without one is arm64/v8."""
        self.assertEqual(select(self.index, parse_platforms("linux/arm/v7")), [self.index["manifests"][2]])
        self.assertTrue(Platform.parse("linux/arm64/v8").matches({"os": "linux", "architecture": "arm64"}))
        self.assertFalse(Platform.parse("linux/arm/v6").matches({"os": "linux", "architecture": "arm"}))

    def test_an_index_without_the_platform_fails(self):
        """Asking for a platform the index lacks is a failure that says what it has."""
        with self.assertRaises(Failed) as caught:
            select(self.index, parse_platforms("linux/s390x"))
        self.assertIn("linux/s390x", str(caught.exception))
        self.assertIn("linux/arm64/v8", str(caught.exception))

    def test_bad_platforms_are_refused(self):
        """A platform is os/arch or os/arch/variant."""
        for text in ["linux", "linux/arm64/v8/x", "Linux/AMD64", "linux//v8"]:
            with self.assertRaises(ValueError, msg=text):
                parse_platforms(text)


class ManifestTests(SynchronousTestCase):
    def test_blobs_are_the_config_then_the_layers(self):
        """An image manifest's blobs are its config and its layers, in order."""
        config, layer = {"digest": DIGEST, "size": 1}, {"digest": "sha256:" + "b" * 64, "size": 2}
        self.assertEqual(blobs_of({"config": config, "layers": [layer]}), [config, layer])

    def test_malformed_manifests_fail_the_image(self):
        """A missing config, a layer or index entry that is no descriptor: a Failed, not a crash."""
        for doc in [{"layers": []}, {"config": {"digest": DIGEST}, "layers": [7]},
                    {"config": {"digest": DIGEST}, "layers": [{"digest": 7}]},
                    {"config": {"digest": DIGEST}, "layers": {"digest": DIGEST, "x": 1}}]:
            with self.assertRaises(Failed, msg=doc):
                blobs_of(doc)
        for index in [{"manifests": [None]}, {"manifests": "x"}]:
            with self.assertRaises(Failed, msg=index):
                select(index, None)


class ReportTests(SynchronousTestCase):
    def test_summary_counts_fetched_cached_and_failed(self):
        """hit, revalidated and stale count as cached; miss and join as fetched; None as failed."""
        tally = Tally(images=2, images_failed=["x"])
        for outcome, size in [("hit", 10), ("revalidated", 0), ("stale", 0), ("miss", 2048), ("join", 1), (None, 5)]:
            tally.count(tally.blobs, outcome, size)
        tally.count(tally.manifests, "miss")
        self.assertEqual(
            tally.summary(),
            "prefetch: 2 images (1 failed); manifests: 1 fetched, 0 cached, 0 failed; "
            "blobs: 2 fetched, 3 cached, 1 failed; 2.0 KiB fetched, 10 B already cached; "
            "every blob's digest checked here as it streamed",
        )

    def test_a_terminal_gets_a_progress_bar(self):
        """On a terminal the bytes go to a rich progress bar, and lines printed above it reach the output."""
        out = io.StringIO()
        out.isatty = lambda: True
        bar = Bar(out)
        bar.expect(100)
        bar.advance(40)
        self.assertEqual((bar.progress.tasks[0].total, bar.progress.tasks[0].completed), (100, 40))
        bar.line("alpine: done")
        bar.close()
        self.assertIn("alpine: done", out.getvalue())


class CommandLineTests(SynchronousTestCase):
    def refused(self, argv, environ=None):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as caught:
            main(argv, io.StringIO(), environ or {})
        self.assertEqual(caught.exception.code, 2)
        return err.getvalue()

    def test_usage_errors_exit_2_saying_why(self):
        """No images, a bad platform, a mirror that is no URL, creds without a colon, a missing list file."""
        self.assertIn("no images", self.refused([]))
        self.assertIn("--platform", self.refused(["--platform", "amd64", "alpine"]))
        self.assertIn("--mirror", self.refused(["--mirror", "127.0.0.1:5000", "alpine"]))
        self.assertIn("--mirror", self.refused(["alpine"], {"REGCACHE_MIRROR": "ftp://x"}))
        self.assertIn("--creds", self.refused(["--creds", "token", "alpine"]))
        self.assertIn("--from-file", self.refused(["--from-file", "/nonexistent/images.txt"]))


class ScriptedMirror:
    """
    A stand-in mirror on loopback that answers each GET with the next of a
    list of (status, headers, body), and records what it was asked.
    """

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append((self.path, dict(self.headers)))
                status, headers, body = mirror.answers.pop(0)
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class ClientTests(SynchronousTestCase):
    image = ImageRef("ghcr.io", "owner/app", "v1", None)
    data = b"layer bytes"

    def client(self, answers):
        mirror = ScriptedMirror(answers)
        self.addCleanup(mirror.close)
        return mirror, MirrorClient(mirror.url, creds="ci:s3cret", timeout=10)

    def descriptor(self, data=None):
        return {"digest": "sha256:" + hashlib.sha256(data or self.data).hexdigest(), "size": len(data or self.data)}

    def test_a_blob_is_checked_against_its_digest(self):
        """Bytes that do not match the blob's digest fail it, whatever the mirror's status said."""
        mirror, client = self.client([(200, {"X-Cache": "hit"}, b"other bytes")])
        with self.assertRaises(Failed) as caught:
            client.blob(self.image, self.descriptor(), lambda n: None)
        self.assertIn("do not match", str(caught.exception))

    def test_5xx_is_retried_and_the_request_names_the_registry(self):
        """A 503 is tried again; every request carries ?ns=, Basic credentials, and the outcome is X-Cache's."""
        seen = []
        mirror, client = self.client([(503, {}, b'{"errors":[{"code":"UNAVAILABLE","message":"upstream down"}]}'),
                                      (200, {"X-Cache": "miss"}, self.data)])
        self.assertEqual(client.blob(self.image, self.descriptor(), seen.append), "miss")
        self.assertEqual(sum(seen), len(self.data))
        digest = self.descriptor()["digest"]
        self.assertEqual([p for p, _ in mirror.requests], [f"/v2/owner/app/blobs/{digest}?ns=ghcr.io"] * 2)
        self.assertEqual(mirror.requests[0][1]["Authorization"], "Basic Y2k6czNjcmV0")

    def test_persistent_5xx_fails_in_words(self):
        """Three 5xx answers in a row fail the blob with the mirror's message and the attempts made."""
        error = (502, {}, b'{"errors":[{"code":"UNAVAILABLE","message":"upstream down"}]}')
        mirror, client = self.client([error] * 3)
        with self.assertRaises(Failed) as caught:
            client.blob(self.image, self.descriptor(), lambda n: None)
        self.assertEqual(str(caught.exception), f"blob {self.descriptor()['digest']}: 502 upstream down (3 attempts)")

    def test_a_4xx_is_not_retried(self):
        """A 404 fails at once: asking again would only be told the same."""
        mirror, client = self.client([(404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"nope"}]}')])
        with self.assertRaises(Failed) as caught:
            client.manifest(self.image, "v1")
        self.assertEqual(str(caught.exception), "manifest v1: 404 nope")
        self.assertEqual(len(mirror.requests), 1)

    def test_a_tag_manifest_is_checked_against_the_digest_the_mirror_names(self):
        """A tag's manifest must match its Docker-Content-Digest, and a digest read from an index is checked first."""
        body = b'{"mediaType": "application/vnd.oci.image.manifest.v1+json"}'
        named = "sha256:" + hashlib.sha256(body).hexdigest()
        mirror, client = self.client([(200, {"Docker-Content-Digest": named, "X-Cache": "hit"}, body),
                                      (200, {"Docker-Content-Digest": named}, body + b" ")])
        self.assertEqual(client.manifest(self.image, "v1")[::3], (named, "hit"))
        with self.assertRaises(Failed):
            client.manifest(self.image, "v1")
        with self.assertRaises(Failed):
            client.manifest(self.image, "../../etc")
        self.assertEqual(len(mirror.requests), 2)
