# test-case-name: tests.test_chain
"""
An upstream that is a chain of registries: the whole mirror over two fake
Hubs behind one HTTP client, as production shares one, on one
MemoryReactorClock.  The first member lacks or fails, the second serves;
each keeps its own credentials and tokens; a blob resumes where it came
from; whatever a member sends is verified.
"""

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from regcache.auth import Credentials
from regcache.chain import Chain
from regcache.errors import UpstreamError, UpstreamNotFound
from regcache.reference import Digest
from regcache.upstream import Timeouts, Upstream
from tests.fakes.hub import FakeHub
from tests.support import TreqRig, hub_images
from tests.test_hygiene import ALL


class ByHost(Resource):
    """Both fake Hubs on one resource, chosen by the request's Host, as DNS would."""

    isLeaf = True

    def __init__(self, hubs):
        super().__init__()
        self.hubs = hubs

    def render(self, request):
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        for hub in self.hubs:
            if host in hub.hosts.values():
                return hub.resource().render(request)
        raise AssertionError(f"no fake answers for {host}")


class Recording:
    """The shared HTTP client, remembering the Host and Authorization of every request sent."""

    def __init__(self, treq):
        self.treq = treq
        self.sent = []

    def _note(self, url, headers):
        headers = headers if isinstance(headers, Headers) else Headers(headers or {})
        self.sent.append((url.split("/")[2], (headers.getRawHeaders(b"authorization") or [None])[0]))

    def request(self, method, url, headers=None, **kwargs):
        self._note(url, headers)
        return self.treq.request(method, url, headers=headers, **kwargs)

    def get(self, url, headers=None, **kwargs):
        self._note(url, headers)
        return self.treq.get(url, headers=headers, **kwargs)


class Refusing:
    """An HTTP client whose every connection is refused."""

    def request(self, *args, **kwargs):
        return fail(ConnectionRefusedError("refused"))

    get = request


def fake(label, images, clock, **options):
    return FakeHub(images, clock=clock, registry_host=f"registry.{label}.fake", auth_host=f"auth.{label}.fake",
                   cdn_host=f"cdn.{label}.fake", control_host=f"control.{label}.fake", **options)


class ChainRig(TreqRig):
    """
    The mirror over Chain([first, second]): ``first`` serves ``first_images``
    (none by default), ``second`` the whole catalog and the private repo
    ``ci/private`` of its user ``ci``.
    """

    def __init__(self, first_images=(), first_credentials=None, second_credentials=None, refused=False):
        self.images, _ = hub_images()
        self.timeouts = Timeouts(header=5, idle=5, attempts=3, retry_budget=10)

        def make(reactor, metrics):
            self.first = fake("a", [self.images[n] for n in first_images], reactor, users={"alice": "a-pass"})
            self.second = fake("b", self.images.values(), reactor, users={"ci": "s3cret"},
                               private={"ci/private": "ci"})
            self.treq = StubTreq(ByHost([self.first, self.second]))
            self.http = Recording(self.treq)
            members = [
                Upstream(url, Refusing() if refused and i == 0 else self.http, reactor, metrics, credentials,
                         self.timeouts, jitter=lambda: 0.5, docker_hub=True, key="docker.io")
                for i, (url, credentials) in enumerate([(self.first.registry_url, first_credentials),
                                                        (self.second.registry_url, second_credentials)])
            ]
            return Chain(members, reactor)

        super().__init__(upstream=make)

    def get(self, path, headers=None):
        c = self.client(path, "GET", headers)
        self.pass_time(60)
        return c

    def asked(self, hub, what="/manifests/"):
        """Requests ``hub``'s registry received for ``what``."""
        return [r for r in hub.requests if r["host"] == "registry" and what in r["path"]]


MANIFEST = "/v2/library/small/manifests/1"


class FallThroughTests(SynchronousTestCase):
    def assertSecondServes(self, rig):
        image = rig.images["library/small:1"]
        client = rig.get(MANIFEST, {"Accept": ALL})
        self.assertEqual(client.status(), 200, client.body())
        self.assertEqual(client.header("Docker-Content-Digest"), image.digest)
        self.assertEqual(rig.second.stats()["manifest_gets_total"], 1)
        return client

    def faulted(self, *args, **kwargs):
        """A chain whose first member has the image but answers its manifests with a fault."""
        rig = ChainRig(first_images=list(hub_images()[0]))
        rig.first.fault(*args, scope="manifests", **kwargs)
        return rig

    def test_first_lacks_the_image_second_serves_it(self):
        """mirror.gcr.io's case: the first member has no such repository, the second serves it."""
        rig = ChainRig()
        self.assertSecondServes(rig)
        self.assertTrue(rig.asked(rig.first))

    def test_404_falls_through(self):
        """A plain 404 from the first member passes the request to the second."""
        self.assertSecondServes(self.faulted("status", status=404))

    def test_401_falls_through(self):
        """A 401 the first member will not explain passes the request on."""
        self.assertSecondServes(self.faulted("status", status=401))

    def test_403_falls_through(self):
        """A 403 from the first member passes the request on."""
        self.assertSecondServes(self.faulted("status", status=403))

    def test_429_falls_through_and_cools_down_that_member_only(self):
        """
        A rate-limited first member passes the request on, and while it
        cools down the chain asks it nothing: a later tag goes straight to
        the second member.
        """
        rig = self.faulted("status", status=429, retry_after=120)
        self.assertSecondServes(rig)
        before = len(rig.asked(rig.first))
        client = rig.get("/v2/library/multi/manifests/1", {"Accept": ALL})
        self.assertEqual(client.status(), 200)
        self.assertEqual(len(rig.asked(rig.first)), before)

    def test_5xx_falls_through(self):
        """A first member answering 503 (after its own retries) passes the request on."""
        rig = self.faulted("status", status=503)
        self.assertSecondServes(rig)
        self.assertGreater(len(rig.asked(rig.first)), 1)

    def test_refused_connection_falls_through(self):
        """A first member that cannot be connected to passes the request on."""
        self.assertSecondServes(ChainRig(refused=True))

    def test_timeout_falls_through(self):
        """A first member that never answers costs its header timeout, then the second serves."""
        self.assertSecondServes(self.faulted("hang"))

    def test_concurrent_clients_cost_one_request_per_member(self):
        """
        Five clients asking at once for what only the second member has
        cause the upstream requests one client does, on each member.
        """
        one = ChainRig()
        self.assertEqual(one.get(MANIFEST, {"Accept": ALL}).status(), 200)
        five = ChainRig()
        clients = [five.client(MANIFEST, "GET", {"Accept": ALL}) for _ in range(5)]
        five.pass_time(20)
        self.assertEqual([c.status() for c in clients], [200] * 5)
        for hub in ("first", "second"):
            self.assertEqual(len(five.asked(getattr(five, hub))), len(one.asked(getattr(one, hub))), hub)
        self.assertEqual(five.second.stats()["manifest_gets_total"], 1)
        self.assertEqual(five.second.stats()["manifest_heads_total"], 1)

    def test_all_members_failing_is_an_outage_not_a_miss(self):
        """
        When one member lacks the image and the other is down, the image
        may exist: the chain fails as an outage (so a stale copy can stand
        in), in words naming the member that failed.
        """
        rig = ChainRig()
        rig.second.fault("status", scope="manifests", status=503)
        d = Deferred.fromCoroutine(rig.upstream.head_manifest("library/small", "1", [ALL]))
        rig.pass_time(20)
        error = self.failureResultOf(d, UpstreamError).value
        self.assertIn("upstream registry.b.fake answered 503", str(error))
        self.assertIn("do not have it", str(error))

    def test_every_member_missing_is_a_miss(self):
        """Only when every member says it has no such image is it unknown."""
        rig = ChainRig()
        d = Deferred.fromCoroutine(rig.upstream.head_manifest("nobody/missing", "1", [ALL]))
        rig.pass_time(20)
        self.failureResultOf(d, UpstreamNotFound)


class CredentialsTests(SynchronousTestCase):
    def test_each_member_sends_only_its_own_credentials(self):
        """
        The first member's token realm sees only its credentials, the
        second's only its own, and no request to either carries the other's.
        """
        alice, ci = Credentials("alice", "a-pass"), Credentials("ci", "s3cret")
        rig = ChainRig(first_credentials=alice, second_credentials=ci)
        client = rig.get("/v2/ci/private/manifests/1", {"Accept": ALL})
        self.assertEqual(client.status(), 200, client.body())
        basic = {host: {a for h, a in rig.http.sent if h == host and a and a.startswith(b"Basic ")}
                 for host in ("auth.a.fake", "auth.b.fake")}
        self.assertEqual(basic, {"auth.a.fake": {alice.basic()}, "auth.b.fake": {ci.basic()}})
        for host, authorization in rig.http.sent:
            self.assertNotIn(authorization, {ci.basic()} if ".a." in host else {alice.basic()})

    def test_members_keep_their_own_tokens(self):
        """A token fetched for one member is held by that member alone."""
        rig = ChainRig()
        self.assertEqual(rig.get(MANIFEST, {"Accept": ALL}).status(), 200)
        first, second = rig.upstream.members
        self.assertEqual((len(first.tokens), len(second.tokens)), (1, 1))
        self.assertEqual(rig.first.stats()["token_requests"], 1)
        self.assertEqual(rig.second.stats()["token_requests"], 1)


class BlobTests(SynchronousTestCase):
    def layer(self, rig):
        layer = rig.images["library/small:1"].layers[0]
        with open(layer.path, "rb") as f:
            return Digest.parse(layer.digest), f.read()

    def test_resume_goes_to_the_member_that_was_sending(self):
        """
        The first member fails the blob, the second starts sending it and
        breaks off: the rest is asked of the second, with Range, and the
        first is not asked again.
        """
        rig = ChainRig(first_images=list(hub_images()[0]))
        digest, data = self.layer(rig)
        rig.first.fault("status", scope="blobs", status=503, times=3)
        rig.second.fault("reset", scope="blobs", times=1, after=len(data) // 3)
        client = rig.get(f"/v2/library/small/blobs/{digest}")
        self.assertEqual(client.status(), 200)
        self.assertEqual(client.body(), data)
        self.assertEqual(rig.blob_file(digest), data)
        self.assertEqual(rig.first.stats()["cdn_blob_gets"].get(str(digest)), 3)
        self.assertEqual(rig.second.stats()["cdn_range_gets"].get(str(digest)), 1)

    def test_blob_from_a_later_member_is_verified(self):
        """Wrong bytes from the second member are refused as they would be from the first: nothing is stored."""
        rig = ChainRig()
        digest, data = self.layer(rig)
        rig.second.fault("wrong", scope="blobs")
        client = rig.get(f"/v2/library/small/blobs/{digest}")
        self.assertNotEqual(client.body(), data)
        self.assertIsNone(rig.blob_file(digest))

    def test_manifest_with_the_wrong_digest_falls_through(self):
        """A first member sending bytes that do not match the digest is passed over; the second's are kept."""
        rig = ChainRig(first_images=list(hub_images()[0]))
        rig.first.fault("wrong", scope="manifests")
        image = rig.images["library/small:1"]
        client = rig.get(f"/v2/library/small/manifests/{image.digest}", {"Accept": ALL})
        self.assertEqual(client.status(), 200)
        self.assertEqual(client.body(), image.manifest)
        self.assertEqual(rig.second.stats()["manifest_gets_total"], 1)


class MetricsTests(SynchronousTestCase):
    def test_requests_are_labelled_by_member(self):
        """Upstream request counts carry the upstream's name and the member asked."""
        rig = ChainRig()
        self.assertEqual(rig.get(MANIFEST, {"Accept": ALL}).status(), 200)
        samples = rig.metrics.upstream_requests.collect()[0].samples
        labelled = {(s.labels["upstream"], s.labels["member"]) for s in samples}
        self.assertEqual(labelled, {("docker.io", "registry.a.fake"), ("docker.io", "registry.b.fake")})


class HealthTests(SynchronousTestCase):
    def test_a_chain_reports_each_member_in_order(self):
        """A chain's health lists every member, in the order they are tried."""
        rig = ChainRig()
        chain = rig.policy.default.upstream
        self.assertEqual([(h.member, h.state) for h in chain.health()],
                         [("registry.a.fake", "up"), ("registry.b.fake", "up")])

    def test_an_open_member_is_skipped_without_being_asked(self):
        """
        A first member that hung has its circuit open: the next tag goes
        straight to the second member, with no request to the first and no
        wait (its probe is not yet due), and the chain's health shows the
        first open.
        """
        rig = ChainRig(first_images=list(hub_images()[0]))
        rig.first.fault("hang", scope="all")
        first = rig.client(MANIFEST, "GET", {"Accept": ALL})
        rig.pass_time(5.5)
        self.assertEqual(first.status(), 200)
        chain = rig.policy.default.upstream
        self.assertEqual([h.state for h in chain.health()], ["open", "up"])
        before = len(rig.first.requests)
        client = rig.client("/v2/library/multi/manifests/1", "GET", {"Accept": ALL})
        rig.settle()
        self.assertEqual(client.status(), 200)
        self.assertEqual(len(rig.first.requests), before)

    def test_every_member_open_fails_at_once_in_words(self):
        """With every member's circuit open, an uncached tag fails at once, saying what each member did."""
        rig = ChainRig(refused=True)
        rig.second.fault("hang", scope="all")
        first = rig.client(MANIFEST, "GET", {"Accept": ALL})
        rig.pass_time(5.5)
        self.assertEqual(first.status(), 503)
        client = rig.client("/v2/library/multi/manifests/1", "GET", {"Accept": ALL})
        rig.settle()
        self.assertEqual(client.status(), 503)
        words = client.body().decode()
        self.assertIn("registry.a.fake refused the connection", words)
        self.assertIn("registry.b.fake did not answer within 5 s (--header-timeout)", words)
