# test-case-name: tests.test_remote
"""
The one interface the cache has to an upstream: the single-registry client
and the unit tests' hand-fed upstream both implement it, and a blob comes
back as a stream whose HTTP has already been read (its size, where it
starts, how to resume it), never as a raw response.
"""

import inspect

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from regcache.chain import Chain
from regcache.errors import UpstreamError
from regcache.reference import Digest
from regcache.remote import BlobStream, Remote
from regcache.upstream import ResponseStream, Upstream, blob_stream
from tests.support import FedBody, HandFedUpstream, HubRig, blob


def members(protocol):
    """The attributes and methods a typing.Protocol asks for."""
    methods = {k: v for k, v in vars(protocol).items() if inspect.isfunction(v) and not k.startswith("_")}
    return set(getattr(protocol, "__annotations__", {})), methods


class ConformanceTests(SynchronousTestCase):
    def assertImplements(self, cls, protocol, instance):
        attributes, methods = members(protocol)
        self.assertTrue(methods, "the protocol declares methods")
        for name in attributes:
            self.assertTrue(hasattr(instance, name), f"{cls.__name__} has no {name}")
        for name, declared in methods.items():
            implemented = getattr(cls, name, None)
            self.assertIsNotNone(implemented, f"{cls.__name__} has no {name}")
            self.assertEqual(
                list(inspect.signature(implemented).parameters),
                list(inspect.signature(declared).parameters),
                f"{cls.__name__}.{name}",
            )
        self.assertIsInstance(instance, protocol)

    def test_upstream_is_a_remote(self):
        """The single-registry client offers exactly what the Remote interface declares, with the same parameters."""
        rig = HubRig()
        self.assertImplements(Upstream, Remote, rig.upstream)

    def test_chain_is_a_remote(self):
        """A chain of upstreams offers the same interface, so the cache cannot tell it from one registry."""
        rig = HubRig()
        self.assertImplements(Chain, Remote, Chain([rig.upstream], rig.reactor))

    def test_hand_fed_upstream_is_a_remote(self):
        """The unit tests' upstream implements the same interface, so the fill tests test what production runs."""
        self.assertImplements(HandFedUpstream, Remote, HandFedUpstream())

    def test_response_stream_is_a_blob_stream(self):
        """What open_blob gives back is a BlobStream, its HTTP already read."""
        stream = blob_stream(FedBody(200, {b"Content-Length": [b"3"]}), 0, "upstream x", 5, None)
        self.assertImplements(ResponseStream, BlobStream, stream)


class Collect(Protocol):
    def __init__(self):
        self.data = b""
        self.reason = None

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.reason = reason


class UpstreamStreamTests(SynchronousTestCase):
    """The real client against the fake Hub (registry, 307, CDN)."""

    def setUp(self):
        self.rig = HubRig()
        layer = self.rig.images["library/multi:1"].layers[0]
        self.digest = Digest.parse(layer.digest)
        with open(layer.path, "rb") as f:
            self.data = f.read()

    def resolve(self, awaitable):
        d = Deferred.fromCoroutine(awaitable) if inspect.iscoroutine(awaitable) else awaitable
        self.rig.settle()
        return self.successResultOf(d)

    def body(self, stream) -> bytes:
        got = Collect()
        stream.deliver(got)
        self.rig.settle()
        self.assertTrue(got.reason.check(ResponseDone))
        return got.data

    def test_whole_blob(self):
        """A blob opened from its start says its size, starts at 0, and delivers every byte."""
        stream = self.resolve(self.rig.upstream.open_blob("library/multi", self.digest))
        self.assertEqual((stream.total, stream.start), (len(self.data), 0))
        self.assertEqual(stream.source, self.rig.upstream.key)
        self.assertEqual(stream.idle, self.rig.upstream.timeouts.idle)
        self.assertEqual(self.body(stream), self.data)

    def test_resume_asks_the_same_upstream_for_the_rest(self):
        """A stream resumed at an offset asks its upstream with Range and starts there, the size unchanged."""
        first = self.resolve(self.rig.upstream.open_blob("library/multi", self.digest))
        first.abandon()
        rest = self.resolve(first.resume(1000))
        self.assertEqual((rest.total, rest.start), (len(self.data), 1000))
        self.assertEqual(self.body(rest), self.data[1000:])
        self.assertEqual(self.rig.stats()["cdn_range_gets"][str(self.digest)], 1)

    def test_resume_answered_with_the_whole_blob_starts_at_zero(self):
        """An upstream that ignores Range on a resume gives a stream that says it starts at 0."""
        self.rig.hub.fault("norange", scope="blobs")
        first = self.resolve(self.rig.upstream.open_blob("library/multi", self.digest))
        first.abandon()
        again = self.resolve(first.resume(1000))
        self.assertEqual((again.total, again.start), (len(self.data), 0))
        self.assertEqual(self.body(again), self.data)


class ResponseParsingTests(SynchronousTestCase):
    """How a blob response's status, Content-Range and length become a stream."""

    def stream(self, code, headers, offset):
        return blob_stream(FedBody(code, headers), offset, "upstream x", 5, None)

    def refused(self, code, headers, offset) -> str:
        body = FedBody(code, headers)
        with self.assertRaises(UpstreamError) as caught:
            blob_stream(body, offset, "upstream x", 5, None)
        self.assertEqual(caught.exception.status, 502)
        self.assertEqual(body.transport.producerState, "stopped", "the refused response is given up")
        return str(caught.exception)

    def test_partial_answer_starts_where_asked(self):
        """A 206 from the offset asked for starts there and carries the size after the slash."""
        s = self.stream(206, {b"Content-Range": [b"bytes 100-999/1000"], b"Content-Length": [b"900"]}, 100)
        self.assertEqual((s.total, s.start), (1000, 100))

    def test_partial_answer_of_unknown_size(self):
        """A 206 with ``*`` for the size gives start plus length, or no size when the length is unknown too."""
        s = self.stream(206, {b"Content-Range": [b"bytes 100-999/*"], b"Content-Length": [b"900"]}, 100)
        self.assertEqual((s.total, s.start), (1000, 100))
        s = self.stream(206, {b"Content-Range": [b"bytes 100-999/*"]}, 100)
        self.assertEqual((s.total, s.start), (None, 100))

    def test_whole_answer_to_a_resume_starts_at_zero(self):
        """A 200 to a resume is the whole blob: the stream starts at 0 with the announced length as size."""
        s = self.stream(200, {b"Content-Length": [b"1000"]}, 100)
        self.assertEqual((s.total, s.start), (1000, 0))
        s = self.stream(200, {}, 100)
        self.assertEqual((s.total, s.start), (None, 0))

    def test_partial_answer_at_the_wrong_place(self):
        """A 206 that starts anywhere but the offset asked for, even at 0, is refused in words."""
        for start in (5, 0, 101):
            message = self.refused(206, {b"Content-Range": [b"bytes %d-999/1000" % start]}, 100)
            self.assertIn("upstream x resumed the blob at the wrong place", message)
        message = self.refused(206, {b"Content-Range": [b"items 100-999/1000"]}, 100)
        self.assertIn("wrong place", message)

    def test_malformed_content_range(self):
        """A 206 whose Content-Range cannot be read is refused in words."""
        for value in (b"bytes x-999/1000", b""):
            message = self.refused(206, {b"Content-Range": [value]} if value else {}, 100)
            self.assertIn("upstream x sent a malformed Content-Range", message)


class HandFedStreamTests(SynchronousTestCase):
    def test_resume_goes_back_to_the_upstream_that_was_sending(self):
        """A hand-fed stream resumes through the upstream that opened it, with the offset asked."""
        upstream = HandFedUpstream()
        data, digest = blob(100)
        d = upstream.open_blob("a", digest)
        upstream.answer(0, FedBody(200, {b"Content-Length": [b"100"]}))
        stream = self.successResultOf(d)
        resumed = stream.resume(40)
        self.assertEqual(upstream.calls[1][:3], ("a", digest, 40))
        upstream.answer(1, FedBody(206, {b"Content-Range": [b"bytes 40-99/100"]}))
        self.assertEqual(self.successResultOf(resumed).start, 40)
