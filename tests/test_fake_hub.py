# -*- test-case-name: tests.test_fake_hub -*-
"""
The fixtures every other test trusts: the images are real and stable, and the
fake Hub answers the way Docker Hub does (PROTOCOL.md §2, §3, §6).
"""

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from tests.fakes import images as img
from tests.fakes.hub import FakeHub, accepted_types
from tests.fakes.images import (DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, export_dir,
                                export_oci_layout, moved_images, sha256_file, standard_images)

SIZES = dict(large_size=256 * 1024, small_size=64 * 1024, multi_sizes=(16 * 1024,) * 6)
ALL_TYPES = [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX]

_images_dir = None


def images_dir() -> Path:
    """One small image set for the whole module: generating it is the slow part."""
    global _images_dir
    if _images_dir is None:
        _images_dir = Path(tempfile.mkdtemp(prefix="fake-hub-images-"))
    return _images_dir


def teardown_module(module) -> None:
    if _images_dir is not None:
        shutil.rmtree(_images_dir, ignore_errors=True)


def challenge(response) -> dict:
    value = response.headers.getRawHeaders("www-authenticate")[0]
    assert value.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', value))


class ImagesTests(SynchronousTestCase):
    def test_deterministic_and_cached(self):
        """
        Digests are fixed by the seed, so a second generation in another
        directory gives the same digests, and a third in the same directory
        reuses the files instead of rewriting them.
        """
        a = standard_images(images_dir(), **SIZES)
        other = Path(tempfile.mkdtemp(prefix="fake-hub-images-"))
        self.addCleanup(shutil.rmtree, other, True)
        b = standard_images(other, **SIZES)
        self.assertEqual({k: v.digest for k, v in a.items()}, {k: v.digest for k, v in b.items()})
        layer = b["library/small:1"].layers[0].path
        before = layer.stat().st_mtime_ns
        standard_images(other, **SIZES)
        self.assertEqual(layer.stat().st_mtime_ns, before)

    def test_layers_are_tars_matching_diff_ids(self):
        """
        containerd unpacks layers and checks diff_ids, so each layer must be a
        real (gzip for Docker, plain for OCI) tar whose uncompressed sha256
        is the config's diff_id, and each blob file must hash to its digest.
        """
        images = standard_images(images_dir(), **SIZES)
        for name in ("library/small:1", "library/multi:1"):
            image = images[name]
            config = json.loads(image.config.read_bytes())
            self.assertEqual(config["rootfs"]["type"], "layers")
            self.assertEqual(config["os"], "linux")
            for layer, diff_id in zip(image.layers, config["rootfs"]["diff_ids"]):
                self.assertEqual(sha256_file(layer.path), layer.digest)
                raw = layer.path.read_bytes()
                if layer.media_type == img.DOCKER_LAYER:
                    import gzip
                    raw = gzip.decompress(raw)
                self.assertEqual("sha256:" + hashlib.sha256(raw).hexdigest(), diff_id)
                with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                    self.assertEqual(len(tar.getmembers()), 1)

    def test_standard_media_types(self):
        """Each standard image has the manifest format its tests rely on."""
        images = standard_images(images_dir(), **SIZES)
        self.assertEqual(images["library/small:1"].media_type, DOCKER_MANIFEST)
        self.assertEqual(images["library/multi:1"].media_type, OCI_MANIFEST)
        self.assertEqual(len(images["library/multi:1"].layers), 6)
        large = images["library/large:1"].layers[0].size
        self.assertTrue(256 * 1024 < large <= 256 * 1024 + 10240, large)
        multiarch = images["library/multiarch:1"]
        self.assertEqual(multiarch.media_type, DOCKER_LIST)
        self.assertEqual([c.platform["architecture"] for c in multiarch.children], ["amd64", "arm64"])
        self.assertEqual(images["library/ociindex:1"].media_type, OCI_INDEX)

    def test_moved_images_differ(self):
        """A moved tag must land on a different manifest with different blobs."""
        v1 = standard_images(images_dir(), **SIZES)
        v2 = moved_images(images_dir(), small_size=SIZES["small_size"], multi_sizes=SIZES["multi_sizes"])
        for name, moved in v2.items():
            self.assertEqual(moved.name, name)
            self.assertNotEqual(moved.digest, v1[name].digest)
            self.assertFalse({b.digest for b in moved.blobs()} & {b.digest for b in v1[name].blobs()})


class HubTestCase(SynchronousTestCase):
    def setUp(self):
        self.images = standard_images(images_dir(), **SIZES)
        self.moved = moved_images(images_dir(), small_size=SIZES["small_size"], multi_sizes=SIZES["multi_sizes"])
        self.clock = Clock()
        self.hub = FakeHub(
            self.images.values(), clock=self.clock, users={"alice": "secret"}, private={"alice/private": "alice"},
            alternates=self.moved.values(),
        )
        self.treq = StubTreq(self.hub.app.resource())

    def request(self, method, url, **kwargs):
        kwargs.setdefault("allow_redirects", False)
        d = self.treq.request(method, url, **kwargs)
        self.treq.flush()
        return self.successResultOf(d)

    def body(self, response) -> bytes:
        d = self.treq.content(response)
        self.treq.flush()
        return self.successResultOf(d)

    def token(self, *repos, auth=None) -> str:
        scopes = [f"repository:{r}:pull" for r in repos]
        response = self.request("GET", self.hub.auth_url + "/token",
                                params={"service": "registry.docker.io", "scope": scopes}, auth=auth)
        self.assertEqual(response.code, 200)
        return json.loads(self.body(response))["token"]

    def get(self, path, repo=None, token=None, method="GET", accept=ALL_TYPES, **kwargs):
        headers = kwargs.pop("headers", {})
        headers = headers.copy() if isinstance(headers, Headers) else Headers(headers)
        if token is None and repo is not None:
            token = self.token(repo)
        if token:
            headers.setRawHeaders("authorization", [f"Bearer {token}"])
        if accept:
            headers.setRawHeaders("accept", [", ".join(accept)])
        return self.request(method, self.hub.registry_url + path, headers=headers, **kwargs)

    def assertError(self, response, code, oci_code):
        self.assertEqual(response.code, code)
        body = json.loads(self.body(response))
        self.assertEqual(body["errors"][0]["code"], oci_code)


class AuthTests(HubTestCase):
    def test_ping_challenges_without_scope(self):
        """/v2/ is where clients learn the realm: 401 with realm and service, no scope."""
        response = self.request("GET", self.hub.registry_url + "/v2/")
        self.assertError(response, 401, "UNAUTHORIZED")
        self.assertEqual(challenge(response), {"realm": self.hub.auth_url + "/token", "service": "registry.docker.io"})
        self.assertEqual(response.code, 401)
        ok = self.request("GET", self.hub.registry_url + "/v2/",
                          headers={"authorization": "Bearer " + self.token()})
        self.assertEqual(ok.code, 200)

    def test_token_dance(self):
        """
        A client follows the challenge: 401 naming the scope, token from the
        realm, retry with the bearer token.  One token request is counted.
        """
        first = self.get("/v2/library/small/manifests/1", token="")
        self.assertError(first, 401, "UNAUTHORIZED")
        params = challenge(first)
        self.assertEqual(params["scope"], "repository:library/small:pull")
        self.assertNotIn("error", params)
        response = self.request("GET", params["realm"], params={"service": params["service"], "scope": params["scope"]})
        answer = json.loads(self.body(response))
        self.assertEqual(set(answer), {"token", "access_token", "expires_in", "issued_at"})
        self.assertEqual(answer["expires_in"], 300)
        second = self.get("/v2/library/small/manifests/1", token=answer["token"])
        self.assertEqual(second.code, 200)
        self.assertEqual(self.hub.stats()["token_requests"], 1)

    def test_expired_token(self):
        """Tokens die on the fake's clock; an expired one gets error="invalid_token"."""
        token = self.token("library/small")
        self.clock.advance(299)
        self.assertEqual(self.get("/v2/library/small/manifests/1", token=token).code, 200)
        self.clock.advance(1)
        response = self.get("/v2/library/small/manifests/1", token=token)
        self.assertError(response, 401, "UNAUTHORIZED")
        self.assertEqual(challenge(response)["error"], "invalid_token")

    def test_unknown_token(self):
        """A token the realm never issued is invalid, not merely insufficient."""
        response = self.get("/v2/library/small/manifests/1", token="forged")
        self.assertEqual(challenge(response)["error"], "invalid_token")

    def test_missing_repo_is_insufficient_scope(self):
        """Hub answers a missing repo with 401 insufficient_scope, never 404."""
        response = self.get("/v2/library/nothere/manifests/1", repo="library/nothere")
        self.assertError(response, 401, "UNAUTHORIZED")
        params = challenge(response)
        self.assertEqual(params["error"], "insufficient_scope")
        self.assertEqual(params["scope"], "repository:library/nothere:pull")

    def test_token_for_another_repo(self):
        """A valid token scoped to one repo does not open another."""
        token = self.token("library/small")
        response = self.get("/v2/library/multi/manifests/1", token=token)
        self.assertEqual(challenge(response)["error"], "insufficient_scope")

    def test_private_repo(self):
        """
        A private repo looks missing to anonymous tokens; its owner's Basic
        credentials open it; a wrong password is refused at the realm.
        """
        anonymous = self.get("/v2/alice/private/manifests/1", repo="alice/private")
        self.assertEqual(challenge(anonymous)["error"], "insufficient_scope")
        token = self.token("alice/private", auth=("alice", "secret"))
        self.assertEqual(self.get("/v2/alice/private/manifests/1", token=token).code, 200)
        wrong = self.request("GET", self.hub.auth_url + "/token", auth=("alice", "nope"),
                             params={"service": "registry.docker.io", "scope": "repository:alice/private:pull"})
        self.assertEqual(wrong.code, 401)

    def test_oauth_post(self):
        """containerd's OAuth2 POST with a password grant also yields a token."""
        response = self.request(
            "POST", self.hub.auth_url + "/token",
            data={"grant_type": "password", "username": "alice", "password": "secret",
                  "service": "registry.docker.io", "scope": "repository:alice/private:pull", "client_id": "t"})
        token = json.loads(self.body(response))["access_token"]
        self.assertEqual(self.get("/v2/alice/private/manifests/1", token=token).code, 200)


class ManifestTests(HubTestCase):
    def test_list_becomes_amd64_child(self):
        """
        A tag on a Docker manifest list, asked without the list type, serves
        the linux/amd64 child with the child's digest, so tag -> digest
        depends on Accept.
        """
        multiarch = self.images["library/multiarch:1"]
        amd64 = multiarch.child("amd64")
        response = self.get("/v2/library/multiarch/manifests/1", repo="library/multiarch", accept=[DOCKER_MANIFEST])
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("docker-content-digest"), [amd64.digest])
        self.assertEqual(response.headers.getRawHeaders("content-type"), [DOCKER_MANIFEST])
        self.assertEqual(self.body(response), amd64.manifest)
        full = self.get("/v2/library/multiarch/manifests/1", repo="library/multiarch")
        self.assertEqual(full.headers.getRawHeaders("docker-content-digest"), [multiarch.digest])
        self.assertEqual(self.body(full), multiarch.manifest)

    def test_accept_lines_are_merged(self):
        """dockerd sends one Accept line per type; all of them count."""
        headers = Headers({"accept": ALL_TYPES})
        response = self.get("/v2/library/multiarch/manifests/1", repo="library/multiarch", accept=None,
                            headers=headers)
        self.assertEqual(response.headers.getRawHeaders("content-type"), [DOCKER_LIST])

    def test_accepted_types_parsing(self):
        """Parameters and spaces around each type are dropped."""

        class R:
            requestHeaders = Headers({"accept": ["a/b; q=0.5,  c/d", "e/f"]})

        self.assertEqual(accepted_types(R()), {"a/b", "c/d", "e/f"})

    def test_oci_index_not_accepted(self):
        """An OCI index by tag without its type in Accept is 404 MANIFEST_UNKNOWN; by digest it is served."""
        index = self.images["library/ociindex:1"]
        token = self.token("library/ociindex")
        self.assertError(self.get("/v2/library/ociindex/manifests/1", token=token, accept=[DOCKER_MANIFEST]),
                         404, "MANIFEST_UNKNOWN")
        ok = self.get("/v2/library/ociindex/manifests/1", token=token)
        self.assertEqual(ok.headers.getRawHeaders("content-type"), [OCI_INDEX])
        by_digest = self.get(f"/v2/library/ociindex/manifests/{index.digest}", token=token, accept=None)
        self.assertEqual(self.body(by_digest), index.manifest)

    def test_head_has_get_headers(self):
        """HEAD carries Content-Type, Docker-Content-Digest, Content-Length and Etag, with no body."""
        small = self.images["library/small:1"]
        response = self.get("/v2/library/small/manifests/1", repo="library/small", method="HEAD")
        self.assertEqual(response.code, 200)
        h = response.headers
        self.assertEqual(h.getRawHeaders("content-type"), [DOCKER_MANIFEST])
        self.assertEqual(h.getRawHeaders("docker-content-digest"), [small.digest])
        self.assertEqual(h.getRawHeaders("content-length"), [str(small.size)])
        self.assertEqual(h.getRawHeaders("etag"), [f'"{small.digest}"'])
        self.assertEqual(self.body(response), b"")
        self.assertEqual(self.hub.stats()["manifest_heads"], {"library/small": 1})

    def test_unknown_tag(self):
        """A missing tag in an existing repo is a plain 404 MANIFEST_UNKNOWN."""
        self.assertError(self.get("/v2/library/small/manifests/nope", repo="library/small"), 404, "MANIFEST_UNKNOWN")

    def test_if_none_match(self):
        """A matching If-None-Match gets 304, which a mirror must never cache as a body."""
        small = self.images["library/small:1"]
        response = self.get("/v2/library/small/manifests/1", repo="library/small",
                            headers={"if-none-match": [f'"{small.digest}"']})
        self.assertEqual(response.code, 304)

    def test_move_tag(self):
        """A moved tag resolves to the other manifest; the old one stays fetchable by digest."""
        old, new = self.images["library/small:1"], self.moved["library/small:1"]
        self.hub.move_tag("library/small", "1", image=new)
        token = self.token("library/small")
        moved = self.get("/v2/library/small/manifests/1", token=token)
        self.assertEqual(moved.headers.getRawHeaders("docker-content-digest"), [new.digest])
        self.assertEqual(self.get(f"/v2/library/small/manifests/{old.digest}", token=token).code, 200)

    def test_tags_list(self):
        """The tag list is sorted and honours n and last."""
        self.hub.move_tag("library/small", "2", image=self.moved["library/small:1"])
        response = self.get("/v2/library/small/tags/list?n=1&last=1", repo="library/small")
        self.assertEqual(json.loads(self.body(response)), {"name": "library/small", "tags": ["2"]})


class RateLimitTests(HubTestCase):
    def test_get_counts_head_does_not(self):
        """Only manifest GETs spend the quota; HEADs carry the headers for free."""
        self.hub.set_ratelimit(10)
        token = self.token("library/small")
        head = self.get("/v2/library/small/manifests/1", token=token, method="HEAD")
        self.assertEqual(head.headers.getRawHeaders("ratelimit-remaining"), ["10;w=21600"])
        self.assertEqual(head.headers.getRawHeaders("ratelimit-limit"), ["10;w=21600"])
        self.assertEqual(head.headers.getRawHeaders("docker-ratelimit-source"), ["127.0.0.1"])
        get = self.get("/v2/library/small/manifests/1", token=token)
        self.assertEqual(get.headers.getRawHeaders("ratelimit-remaining"), ["9;w=21600"])
        self.assertEqual(self.hub.stats()["ratelimit"]["remaining"], 9)

    def test_ratelimit_preview_is_a_free_check(self):
        """ratelimitpreview/test:latest answers a HEAD with the rate-limit headers and spends nothing."""
        self.hub.set_ratelimit(10, remaining=7)
        head = self.get("/v2/ratelimitpreview/test/manifests/latest", repo="ratelimitpreview/test", method="HEAD")
        self.assertEqual(head.code, 200)
        self.assertEqual(head.headers.getRawHeaders("ratelimit-remaining"), ["7;w=21600"])
        self.assertEqual(self.hub.stats()["ratelimit"]["remaining"], 7)
        self.assertEqual(self.hub.stats()["manifest_heads"], {"ratelimitpreview/test": 1})

    def test_429_at_zero(self):
        """At zero, manifest GETs get 429 TOOMANYREQUESTS (with Retry-After if set); HEAD still works."""
        self.hub.set_ratelimit(1, retry_after=60)
        token = self.token("library/small")
        self.assertEqual(self.get("/v2/library/small/manifests/1", token=token).code, 200)
        limited = self.get("/v2/library/small/manifests/1", token=token)
        self.assertEqual(limited.headers.getRawHeaders("retry-after"), ["60"])
        self.assertError(limited, 429, "TOOMANYREQUESTS")
        self.assertEqual(self.get("/v2/library/small/manifests/1", token=token, method="HEAD").code, 200)
        self.assertEqual(self.hub.stats()["rate_limited"], 1)


class BlobTests(HubTestCase):
    def setUp(self):
        super().setUp()
        self.layer = self.images["library/small:1"].layers[0]
        self.token_ = self.token("library/small")

    def location(self) -> str:
        response = self.get(f"/v2/library/small/blobs/{self.layer.digest}", token=self.token_)
        self.assertEqual(response.code, 307)
        return response.headers.getRawHeaders("location")[0]

    def test_redirect_to_cdn(self):
        """A blob GET is a 307 to the CDN host, at Hub's path, with a signature."""
        location = self.location()
        prefix = (f"{self.hub.cdn_url}/registry-v2/docker/registry/v2/blobs/sha256/"
                  f"{self.layer.hex[:2]}/{self.layer.hex}/data?verify=")
        self.assertTrue(location.startswith(prefix), location)
        self.assertEqual(self.hub.stats()["registry_blob_gets"], {self.layer.digest: 1})

    def test_blob_head(self):
        """HEAD on a blob answers 200 with the size, without a redirect."""
        response = self.get(f"/v2/library/small/blobs/{self.layer.digest}", token=self.token_, method="HEAD")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-length"), [str(self.layer.size)])

    def test_unknown_blob(self):
        """A blob not in the repo is 404 BLOB_UNKNOWN."""
        missing = "sha256:" + "0" * 64
        self.assertError(self.get(f"/v2/library/small/blobs/{missing}", token=self.token_), 404, "BLOB_UNKNOWN")

    def test_cdn_serves_and_counts(self):
        """The CDN streams the exact blob, and counts one GET for it."""
        response = self.request("GET", self.location())
        self.assertEqual(response.code, 200)
        self.assertEqual("sha256:" + hashlib.sha256(self.body(response)).hexdigest(), self.layer.digest)
        stats = self.hub.stats()
        self.assertEqual(stats["cdn_blob_gets"], {self.layer.digest: 1})
        self.assertEqual(stats["cdn_bytes_sent"], self.layer.size)

    def test_cdn_counts_its_429s(self):
        """
        A blob GET the CDN answers 429 (the abuse mode's storm) is a GET,
        and is also counted as rate limited: the soak's allowance for
        refused fetches.
        """
        location = self.location()
        self.hub.mode("429-abuse")
        self.assertEqual(self.request("GET", location).code, 429)
        stats = self.hub.stats()
        self.assertEqual((stats["cdn_blob_gets"], stats["cdn_rate_limited"]),
                         ({self.layer.digest: 1}, {self.layer.digest: 1}))

    def test_cdn_rejects_authorization(self):
        """Like a signed-URL store, the CDN refuses a request that still carries Authorization."""
        response = self.request("GET", self.location(), headers={"authorization": "Bearer " + self.token_})
        self.assertEqual(response.code, 400)
        self.assertEqual(self.hub.stats()["cdn_authorization"], 1)

    def test_cdn_url_expires(self):
        """Signed URLs are short-lived, so a mirror must not cache them."""
        location = self.location()
        self.clock.advance(self.hub.cdn_url_ttl + 1)
        self.assertEqual(self.request("GET", location).code, 403)

    def test_cdn_range(self):
        """Single ranges get 206 with Content-Range; an impossible one gets 416."""
        location, data = self.location(), self.layer.path.read_bytes()
        size = len(data)
        cases = {
            "bytes=100-": (100, size - 1),
            "bytes=10-19": (10, 19),
            "bytes=-50": (size - 50, size - 1),
            f"bytes={size - 5}-{size + 100}": (size - 5, size - 1),
        }
        for value, (start, end) in cases.items():
            response = self.request("GET", location, headers={"range": value})
            self.assertEqual(response.code, 206, value)
            self.assertEqual(response.headers.getRawHeaders("content-range"), [f"bytes {start}-{end}/{size}"])
            self.assertEqual(self.body(response), data[start:end + 1])
        response = self.request("GET", location, headers={"range": f"bytes={size}-"})
        self.assertEqual(response.code, 416)
        self.assertEqual(response.headers.getRawHeaders("content-range"), [f"bytes */{size}"])


class FaultTests(HubTestCase):
    def setUp(self):
        super().setUp()
        self.layer = self.images["library/small:1"].layers[0]
        self.token_ = self.token("library/small")
        response = self.get(f"/v2/library/small/blobs/{self.layer.digest}", token=self.token_)
        self.location = response.headers.getRawHeaders("location")[0]

    def test_status_once(self):
        """A fault with times=1 fails one request, then the next succeeds: retries can be tested."""
        self.hub.fault("status", scope="manifests", status=503, times=1)
        self.assertEqual(self.get("/v2/library/small/manifests/1", token=self.token_).code, 503)
        self.assertEqual(self.get("/v2/library/small/manifests/1", token=self.token_).code, 200)

    def test_status_scope(self):
        """A blob-scoped fault leaves manifests alone."""
        self.hub.fault("status", scope="blobs", status=502)
        self.assertEqual(self.get("/v2/library/small/manifests/1", token=self.token_).code, 200)
        self.assertEqual(self.request("GET", self.location).code, 502)

    def test_wrong_bytes(self):
        """'wrong' keeps the length and changes the bytes, so only digest checks catch it."""
        self.hub.fault("wrong", scope="blobs")
        body = self.body(self.request("GET", self.location))
        self.assertEqual(len(body), self.layer.size)
        self.assertNotEqual(body, self.layer.path.read_bytes())

    def test_short_body(self):
        """'short' closes after half the promised Content-Length; the client sees a failed body."""
        self.hub.fault("short", scope="blobs")
        response = self.request("GET", self.location)
        self.assertEqual(response.length, self.layer.size)
        d = self.treq.content(response)
        self.treq.flush()
        self.failureResultOf(d)
        self.assertEqual(self.hub.stats()["cdn_bytes_sent"], self.layer.size // 2)

    def test_reset_after(self):
        """'reset' cuts the connection after the given number of body bytes."""
        self.hub.fault("reset", scope="blobs", after=1000)
        response = self.request("GET", self.location)
        d = self.treq.content(response)
        self.treq.flush()
        self.failureResultOf(d)
        self.assertEqual(self.hub.stats()["cdn_bytes_sent"], 1000)

    def test_hang(self):
        """'hang' never answers, so timeouts can be tested."""
        self.hub.fault("hang", scope="manifests")
        d = self.treq.get(self.hub.registry_url + "/v2/library/small/manifests/1",
                          headers={"authorization": "Bearer " + self.token_})
        self.treq.flush()
        self.assertNoResult(d)

    def test_drip(self):
        """'drip' sends one chunk per interval of the fake's clock."""
        self.hub.fault("drip", scope="blobs", chunk=16 * 1024, interval=0.05)
        response = self.request("GET", self.location)
        d = self.treq.content(response)
        ticks = 0
        while not d.called:
            self.clock.advance(0.05)
            self.treq.flush()
            ticks += 1
        self.assertEqual(self.successResultOf(d), self.layer.path.read_bytes())
        self.assertGreaterEqual(ticks, self.layer.size // (16 * 1024))

    def test_huge(self):
        """'huge' streams filler without a Content-Length, one chunk per interval, until ``size``."""
        self.hub.fault("huge", scope="manifests", size=40 * 1024, chunk=16 * 1024, interval=1)
        response = self.get("/v2/library/small/manifests/1", token=self.token_)
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders("content-length"))
        d = self.treq.content(response)
        self.treq.flush()
        self.assertNoResult(d)
        for _ in range(3):
            self.clock.advance(1)
            self.treq.flush()
        self.assertEqual(len(self.successResultOf(d)), 40 * 1024)

    def test_huge_error_page(self):
        """'huge' with a status is an error page of that size."""
        self.hub.fault("huge", scope="blobs", status=502, size=1000)
        response = self.request("GET", self.location)
        self.assertEqual(response.code, 502)
        self.assertEqual(len(self.body(response)), 1000)

    def test_token_body_faults(self):
        """The realm takes body kinds too: 'stall' sends the headers and part of the token, then nothing."""
        self.hub.fault("stall", scope="token", after=5)
        d = self.treq.get(self.hub.auth_url + "/token", params={"scope": "repository:library/small:pull"})
        self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        body = self.treq.content(response)
        self.treq.flush()
        self.clock.advance(600)
        self.treq.flush()
        self.assertNoResult(body)
        self.hub.clear_faults()
        self.assertTrue(self.token("library/small"))

    def test_norange(self):
        """'norange' answers a Range request with 200 and the whole blob."""
        self.hub.fault("norange", scope="blobs")
        response = self.request("GET", self.location, headers={"range": "bytes=100-"})
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.body(response)), self.layer.size)

    def test_path_filter(self):
        """A fault with a path only hits requests whose path contains it."""
        self.hub.fault("status", scope="manifests", status=500, path="/library/multi/")
        self.assertEqual(self.get("/v2/library/small/manifests/1", token=self.token_).code, 200)

    def test_control_endpoints(self):
        """The control host takes the same faults as JSON, and serves the counters."""
        control = self.hub.control_url + "/_fake/"
        ok = self.request("POST", control + "fault", data=json.dumps({"kind": "status", "scope": "manifests",
                                                                      "status": 500}).encode())
        self.assertEqual(ok.code, 200)
        self.assertEqual(self.get("/v2/library/small/manifests/1", token=self.token_).code, 500)
        self.request("POST", control + "fault", data=b'{"kind": "clear"}')
        self.request("POST", control + "tag", data=json.dumps(
            {"repo": "library/small", "tag": "1", "image": "library/small:1#2"}).encode())
        moved = self.get("/v2/library/small/manifests/1", token=self.token_)
        self.assertEqual(moved.headers.getRawHeaders("docker-content-digest"), [self.moved["library/small:1"].digest])
        stats = json.loads(self.body(self.request("GET", control + "stats")))
        self.assertEqual(stats["manifest_gets"], {"library/small": 2})
        self.assertEqual(self.request("GET", self.hub.registry_url + "/_fake/stats").code, 404)
        self.request("POST", control + "reset")
        self.assertEqual(self.hub.stats()["manifest_gets_total"], 0)


# -- real processes --------------------------------------------------------

needs_tools = pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("docker-registry")),
                                 reason="needs skopeo and docker-registry")


@pytest.fixture(scope="module")
def hub_process():
    from tests.fakes.serve import FakeHubProcess

    with FakeHubProcess(images_dir(), large_size=SIZES["large_size"]) as hub:
        yield hub


@needs_tools
def test_skopeo_copies_from_fake(hub_process, tmp_path):
    """
    A real client (skopeo) follows the token dance and the 307 to the CDN,
    ends with the exact manifest, and fetches each blob once from the CDN.
    """
    hub_process.reset()
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                    f"docker://{hub_process.registry_host}/library/small:1", f"dir:{tmp_path / 'x'}"],
                   check=True, timeout=60)
    manifest = (tmp_path / "x" / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == hub_process.images["library/small:1"]
    stats = hub_process.stats()
    assert stats["token_requests"] >= 1
    assert stats["cdn_authorization"] == 0
    assert sorted(stats["cdn_blob_gets"].values()) == [1, 1]


def test_fault_over_http(hub_process):
    """The subprocess takes faults on its control port: one 503, then normal service."""
    hub_process.reset()
    token = json.load(urllib.request.urlopen(
        hub_process.auth_url + "/token?service=registry.docker.io&scope=repository:library/small:pull"))["token"]
    request = urllib.request.Request(hub_process.registry_url + "/v2/library/small/manifests/1",
                                     headers={"Authorization": "Bearer " + token, "Accept": DOCKER_MANIFEST})
    hub_process.fault("status", scope="manifests", status=503, times=1)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 503
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Docker-Content-Digest"] == hub_process.images["library/small:1"]
    assert hub_process.stats()["manifest_gets"] == {"library/small": 2}


@needs_tools
def test_down_and_up(hub_process):
    """'down' refuses connections on the registry port; 'up' serves again on the same port."""
    url = hub_process.registry_url + "/v2/"
    hub_process.down("registry")
    try:
        with pytest.raises(urllib.error.URLError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert not isinstance(e.value, urllib.error.HTTPError)
    finally:
        hub_process.up("registry")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401


@needs_tools
def test_real_registry_round_trip(tmp_path):
    """
    Exported images pushed into a real docker-registry keep their digests,
    so the real registry can stand in as an upstream with known content.
    """
    from tests.fakes.registry import RealRegistry

    images = standard_images(images_dir(), **SIZES)
    with RealRegistry(tmp_path / "registry") as registry:
        for name in ("library/small:1", "library/multiarch:1", "library/ociindex:1"):
            image = images[name]
            registry.push_dir(export_dir(image, tmp_path / name.replace("/", "_")), name)
            raw = registry.inspect_raw(name)
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == image.digest
        multi = images["library/multi:1"]
        layout = export_oci_layout(multi, tmp_path / "multi-layout")
        subprocess.run(["skopeo", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false",
                        f"oci:{layout}:1", f"docker://{registry.host}/library/multi:1"], check=True, timeout=60)
        raw = registry.inspect_raw("library/multi:1")
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == multi.digest


@needs_tools
def test_real_registry_proxies_fake(hub_process, tmp_path):
    """docker-registry in proxy mode pulls through the fake, so it can be a reference mirror."""
    from tests.fakes.registry import RealRegistry

    with RealRegistry(tmp_path / "proxy", proxy_remoteurl=hub_process.registry_url) as proxy:
        raw = proxy.inspect_raw("library/multi:1")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == hub_process.images["library/multi:1"]
