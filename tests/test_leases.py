"""
regcache.leases over a fake bucket with the S3 semantics leases rest on
(create-only, If-Match on PUT and DELETE, ETags), a fake peer client and a
task.Clock.
"""

import hashlib
import json

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from regcache.leases import LEASE_DEADLINE, MAX_ROUNDS, BucketTable, Lease, Leases, lease_name
from regcache.metrics import Metrics
from regcache.peers import PeerError
from regcache.reference import Digest
from regcache.s3 import StorageError

DIGEST = Digest.of(b"the blob")
NAME = lease_name(DIGEST)
ME = "http://10.0.0.1:5000"
OTHER = "http://10.0.0.2:5000"
TTL = 30.0


class FakeBucket:
    """Objects with ETags; conditional PUT and DELETE as S3 answers them.  ``hang`` leaves every call unanswered."""

    def __init__(self):
        self.objects = {}
        self.hang = False
        self.fail = False
        self.calls = []

    def _etag(self, body: bytes) -> str:
        return '"' + hashlib.md5(body).hexdigest() + '"'

    async def _gate(self):
        if self.hang:
            await Deferred()
        if self.fail:
            raise StorageError("the object store answered 500", 500)

    async def put_etag(self, name, body, content_type="application/octet-stream", metadata=None,
                       create_only=False, if_match=None):
        self.calls.append(("put", name, create_only, if_match))
        await self._gate()
        current = self.objects.get(name)
        if create_only and current is not None:
            return None
        if if_match is not None and (current is None or current[0] != if_match):
            return None
        etag = self._etag(body + str(len(self.calls)).encode())
        self.objects[name] = (etag, body)
        return etag

    async def read(self, name):
        self.calls.append(("read", name))
        await self._gate()
        current = self.objects.get(name)
        if current is None:
            return None
        info = type("Info", (), {"etag": current[0], "size": len(current[1]), "metadata": {}})()
        return info, current[1]

    async def delete(self, name, if_match=None):
        self.calls.append(("delete", name, if_match))
        await self._gate()
        current = self.objects.get(name)
        if if_match is not None and current is not None and current[0] != if_match:
            return False
        self.objects.pop(name, None)
        return True

    def lease(self) -> Lease:
        return Lease.decode(self.objects[NAME][1])


class FakePeers:
    """Records each forward; answers with a stream, or fails while ``down``."""

    def __init__(self):
        self.opened = []
        self.down = False

    async def open(self, holder, digest, start, resume):
        self.opened.append((holder, digest, start))
        if self.down:
            raise PeerError(f"{holder} refused the connection")
        return ("peer stream", holder, start, resume)


class FakeUpstream:
    key = "hub"

    def __init__(self):
        self.opened = 0

    async def open_blob(self, name, digest):
        self.opened += 1
        return ("upstream stream", digest)


class LeasesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.bucket = FakeBucket()
        self.peers = FakePeers()
        self.upstream = FakeUpstream()
        self.metrics = Metrics()
        self.leases = Leases(BucketTable(self.bucket, self.clock), self.peers, ME, TTL, self.clock, self.metrics)

    def source(self, leases=None, look=None):
        return Deferred.fromCoroutine((leases or self.leases).source(self.upstream, "library/x", DIGEST, look))

    def count(self, metric, *labels):
        return getattr(self.metrics, metric).labels(*labels)._value.get()

    def hold(self, holder=OTHER, expires=None, token="theirs"):
        body = Lease(holder, token, self.clock.seconds() + TTL if expires is None else expires).encode()
        self.bucket.objects[NAME] = ('"theirs"', body)

    def test_the_first_claim_wins_and_fetches_from_upstream(self):
        """No lease yet: this replica creates it in its own name, fetches the blob itself, and shares it."""
        stream, fetched = self.successResultOf(self.source())
        self.assertEqual((stream, fetched), (("upstream stream", DIGEST), True))
        self.assertEqual(self.bucket.calls[0], ("put", NAME, True, None))
        lease = self.bucket.lease()
        self.assertEqual((lease.holder, lease.expires), (ME, self.clock.seconds() + TTL))
        self.assertTrue(self.leases.fetching(DIGEST))
        self.assertEqual(self.count("leases", "won"), 1)

    def test_the_lease_is_renewed_by_compare_and_swap_while_held(self):
        """Every ttl/3 the holder rewrites its lease with If-Match on the ETag it wrote last, pushing the expiry on."""
        self.successResultOf(self.source())
        first = self.bucket.objects[NAME][0]
        self.clock.advance(TTL / 3)
        self.assertEqual(self.bucket.calls[-1], ("put", NAME, False, first))
        self.assertEqual(self.bucket.lease().expires, self.clock.seconds() + TTL)
        second = self.bucket.objects[NAME][0]
        self.clock.advance(TTL / 3)
        self.assertEqual(self.bucket.calls[-1], ("put", NAME, False, second))

    def test_release_deletes_the_lease_it_wrote_and_stops_renewing(self):
        """Giving the lease up deletes it If-Match on its own ETag; no timer is left behind."""
        self.successResultOf(self.source())
        etag = self.bucket.objects[NAME][0]
        self.leases.release(DIGEST)
        self.assertEqual(self.bucket.calls[-1], ("delete", NAME, etag))
        self.assertNotIn(NAME, self.bucket.objects)
        self.assertFalse(self.leases.fetching(DIGEST))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_lease_taken_over_is_never_deleted_by_its_old_holder(self):
        """Another replica took the lease over: the old holder's renewal fails, and its release leaves the new lease."""
        self.successResultOf(self.source())
        self.hold(token="new holder")
        self.clock.advance(TTL / 3)
        self.assertFalse(self.leases.fetching(DIGEST))
        self.leases.release(DIGEST)
        self.assertEqual(self.bucket.lease().token, "new holder")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_release_during_a_renewal_deletes_what_the_renewal_wrote(self):
        """A release while a renewal is under way waits for it and deletes the lease under its new ETag."""
        self.successResultOf(self.source())
        self.bucket.hang = True
        self.clock.advance(TTL / 3)
        self.leases.release(DIGEST)
        self.assertNotIn(("delete", NAME), [c[:2] for c in self.bucket.calls])
        self.bucket.hang = False
        # The renewal's deadline ends it; the release's delete follows.
        self.clock.advance(TTL / 3)
        self.assertEqual(self.bucket.calls[-1][:2], ("delete", NAME))
        self.assertNotIn(NAME, self.bucket.objects)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_live_lease_elsewhere_is_followed_not_fetched(self):
        """Another replica holds a live lease: this one forwards to it, and upstream is not asked."""
        self.hold()
        stream, fetched = self.successResultOf(self.source())
        self.assertEqual((stream[0], stream[1], fetched), ("peer stream", OTHER, False))
        self.assertEqual(self.upstream.opened, 0)
        self.assertFalse(self.leases.fetching(DIGEST))
        self.assertEqual(self.count("leases", "lost"), 1)

    def test_an_expired_lease_is_taken_over_with_a_compare_and_swap(self):
        """A dead holder's expired lease is replaced with If-Match on its ETag, and this replica fetches."""
        self.hold(expires=self.clock.seconds() - 1)
        stream, fetched = self.successResultOf(self.source())
        self.assertEqual(fetched, True)
        self.assertIn(("put", NAME, False, '"theirs"'), self.bucket.calls)
        self.assertEqual(self.bucket.lease().holder, ME)
        self.assertEqual(self.count("leases", "taken_over"), 1)

    def test_of_two_replicas_taking_over_one_wins(self):
        """Two replicas that both read the expired lease: the second compare-and-swap fails, and it follows the first."""
        self.hold(expires=self.clock.seconds() - 1)
        other = Leases(BucketTable(self.bucket, self.clock), self.peers, OTHER, TTL, self.clock, Metrics())
        first = self.source()
        second = self.source(other)
        self.assertEqual(self.successResultOf(first)[1], True)
        stream, fetched = self.successResultOf(second)
        self.assertEqual((stream[1], fetched), (ME, False))

    def test_a_garbled_lease_is_taken_over(self):
        """What is not a lease is treated as an expired one."""
        self.bucket.objects[NAME] = ('"junk"', b"not json")
        self.assertEqual(self.successResultOf(self.source())[1], True)
        self.assertEqual(self.bucket.lease().holder, ME)

    def test_a_live_lease_in_its_own_name_is_a_past_life_and_taken_over(self):
        """A lease naming this replica that it does not hold (it restarted) is taken over, never forwarded to itself."""
        self.hold(holder=ME)
        self.assertEqual(self.successResultOf(self.source())[1], True)
        self.assertEqual(self.peers.opened, [])

    def test_a_bucket_that_does_not_answer_means_fetching_alone(self):
        """
        The bucket late past the deadline: the fetch goes ahead without a
        lease (and is this replica's own, to share) until released; the
        fallback is counted.
        """
        self.bucket.hang = True
        d = self.source()
        self.assertNoResult(d)
        self.clock.advance(LEASE_DEADLINE)
        self.assertEqual(self.successResultOf(d), (("upstream stream", DIGEST), True))
        self.assertEqual(self.count("coordinator_fallbacks", "unavailable"), 1)
        self.assertEqual(self.count("leases", "failed"), 1)
        self.assertTrue(self.leases.fetching(DIGEST))
        self.leases.release(DIGEST)
        self.assertFalse(self.leases.fetching(DIGEST))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_bucket_means_fetching_alone(self):
        """The bucket erring on the claim: the fetch goes ahead without a lease."""
        self.bucket.fail = True
        self.assertEqual(self.successResultOf(self.source())[1], True)
        self.assertEqual(self.count("coordinator_fallbacks", "unavailable"), 1)

    def test_a_dead_holder_is_waited_out_then_taken_over(self):
        """
        The holder refuses: the bucket is looked into again, then the
        replica waits for the lease to expire and takes it over.
        """
        self.hold(expires=self.clock.seconds() + 3)
        self.peers.down = True
        looked = []

        async def look(offset):
            looked.append(offset)
            return None

        d = self.source(look=look)
        self.assertNoResult(d)
        self.assertEqual((len(self.peers.opened), looked), (1, [0]))
        self.clock.advance(3)
        self.assertEqual(self.successResultOf(d)[1], True)
        self.assertEqual(self.bucket.lease().holder, ME)

    def test_the_bucket_copy_is_taken_when_the_holder_finished(self):
        """The holder refuses, but the blob reached the bucket meanwhile: that copy is used, and no lease is taken."""
        self.hold()
        self.peers.down = True

        async def look(offset):
            return "bucket stream"

        self.assertEqual(self.successResultOf(self.source(look=look)), ("bucket stream", False))
        self.assertFalse(self.leases.fetching(DIGEST))

    def test_holders_that_never_send_it_end_in_a_bounded_fetch_alone(self):
        """A live holder that keeps refusing: after MAX_ROUNDS waits, this replica fetches alone."""
        self.peers.down = True
        renewing = []

        def renew():
            # The holder keeps its lease alive, but cannot send.
            self.hold()
            renewing.append(self.clock.callLater(1, renew))

        renew()
        d = self.source()
        for _ in range(MAX_ROUNDS):
            self.clock.pump([1] * int(TTL))
        self.assertEqual(self.successResultOf(d)[1], True)
        self.assertEqual(len(self.peers.opened), MAX_ROUNDS)
        self.assertEqual(self.count("coordinator_fallbacks", "contended"), 1)
        renewing[-1].cancel()

    def test_a_holder_failing_mid_body_is_resumed_from_the_bucket_or_a_new_claim(self):
        """The forwarded stream's resume looks in the bucket first, then claims again: here it wins and fetches."""
        looked = []

        async def look(offset):
            looked.append(offset)
            return None

        self.hold()
        stream, _ = self.successResultOf(self.source(look=look))
        # The holder died and gave its lease up (or it expired).
        del self.bucket.objects[NAME]
        resumed = self.successResultOf(Deferred.fromCoroutine(stream[3](1234)))
        self.assertEqual(resumed, ("upstream stream", DIGEST))
        # Before the claim, and again once it is won.
        self.assertEqual(looked, [1234, 1234])
        self.assertTrue(self.leases.fetching(DIGEST))

    def test_a_claim_won_after_the_holder_shared_the_blob_reads_the_bucket(self):
        """
        The holder before may have shared the blob and let its lease go
        between this replica's look into the bucket and its claim: the won
        claim looks once more, reads the bucket's copy, and gives the lease
        back, so upstream is not asked twice.
        """
        async def look(offset):
            return ("bucket stream", offset)

        self.assertEqual(self.successResultOf(self.source(look=look)), (("bucket stream", 0), False))
        self.assertFalse(self.leases.fetching(DIGEST))
        self.assertNotIn(NAME, self.bucket.objects)

    def test_a_forward_resumes_at_its_offset(self):
        """A resume that finds a live holder asks it for the rest, from the offset reached."""
        self.hold()
        stream, _ = self.successResultOf(self.source())
        resumed = self.successResultOf(Deferred.fromCoroutine(stream[3](4096)))
        self.assertEqual(resumed[:3], ("peer stream", OTHER, 4096))

    def test_a_lease_body_says_holder_token_and_expiry(self):
        """What a lease object holds is JSON other replicas (and an operator) can read."""
        self.successResultOf(self.source())
        body = json.loads(self.bucket.objects[NAME][1])
        self.assertEqual(set(body), {"holder", "token", "expires"})
        self.assertEqual(len(body["token"]), 32)


class SoloSeamTests(SynchronousTestCase):
    def test_solo_turns_to_upstream_only_first(self):
        """Alone, a fill's source is upstream from the start: nothing turns to it later."""
        from regcache.shared import Solo

        self.assertFalse(Solo().fetching(DIGEST))
        upstream = FakeUpstream()
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(Solo().source(upstream, "x", DIGEST))),
                         (("upstream stream", DIGEST), True))
