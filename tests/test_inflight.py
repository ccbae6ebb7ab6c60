# test-case-name: tests.test_inflight
"""
One upstream download per blob, shared by every client that asks while it
runs, streamed to each of them as it arrives.
"""

import errno

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from tests.support import FedBody, Rig, blob, inline
from tests.test_expiry import Deferring

MiB = 1024 * 1024


def blob_path(digest):
    return f"/v2/library/app/blobs/{digest}"


class FanOutTests(SynchronousTestCase):
    def setUp(self):
        self.rig = Rig()
        self.data, self.digest = blob(3 * MiB)

    def start(self, n=1):
        clients = [self.rig.client(blob_path(self.digest)) for _ in range(n)]
        body = FedBody(200, {b"Content-Length": [str(len(self.data)).encode()]})
        self.rig.upstream.answer(0, body)
        return clients, body

    def test_concurrent_clients_share_one_download(self):
        """
        Clients asking for the same missing blob at the same time cause one
        upstream request, and each receives the whole blob.
        """
        clients, body = self.start(4)
        self.assertEqual(len(self.rig.upstream.calls), 1)
        body.feed(self.data)
        body.end()
        for c in clients:
            self.assertEqual(c.status(), 200)
            self.assertEqual(c.body(), self.data)
            self.assertFalse(c.aborted())
        self.assertEqual(self.rig.blob_file(self.digest), self.data)
        self.assertEqual(self.rig.temp_files(), [])

    def test_clients_get_length_and_bytes_before_the_download_ends(self):
        """
        Content-Length is the upstream's, sent at once, and bytes flow to a
        client as they arrive rather than after the blob is stored.
        """
        (c,), body = self.start(1)
        self.assertEqual(c.header("Content-Length"), str(len(self.data)))
        body.feed(self.data[:MiB])
        self.assertEqual(c.body(), self.data[:MiB])
        self.assertIsNone(self.rig.blob_file(self.digest))

    def test_joiner_mid_download_reads_back_then_follows(self):
        """
        A client arriving half-way gets the bytes already written from disk,
        then the rest live, and no second upstream request is made.
        """
        (first,), body = self.start(1)
        body.feed(self.data[: 2 * MiB])
        late = self.rig.client(blob_path(self.digest))
        self.assertEqual(late.body(), self.data[: 2 * MiB])
        body.feed(self.data[2 * MiB :])
        body.end()
        self.assertEqual(late.body(), self.data)
        self.assertEqual(first.body(), self.data)
        self.assertEqual(len(self.rig.upstream.calls), 1)

    def test_slow_client_is_paused_and_slows_nobody(self):
        """
        A client whose connection is full stops receiving while the download
        and a fast client go on; it catches up from disk when it drains.
        """
        (slow, fast), body = self.start(2)
        body.feed(self.data[:MiB])
        slow.slow_down()
        got = len(slow.body())
        body.feed(self.data[MiB:])
        body.end()
        self.assertEqual(len(slow.body()), got)
        self.assertEqual(fast.body(), self.data)
        self.assertEqual(self.rig.blob_file(self.digest), self.data)
        slow.speed_up()
        self.assertEqual(slow.body(), self.data)

    def test_client_hanging_up_does_not_stop_the_download(self):
        """
        The download outlives a client that disconnects: the blob still
        lands in the cache, and other clients are unaffected.
        """
        (leaver, stayer), body = self.start(2)
        body.feed(self.data[:MiB])
        leaver.hang_up()
        body.feed(self.data[MiB:])
        body.end()
        self.assertEqual(stayer.body(), self.data)
        self.assertEqual(self.rig.blob_file(self.digest), self.data)

    def test_digest_mismatch_aborts_everyone_and_stores_nothing(self):
        """
        Bytes that do not match the digest are never stored, and no client
        ever receives the full length: every connection is aborted.
        """
        (a, b), body = self.start(2)
        bad = bytearray(self.data)
        bad[-1] ^= 0xFF
        body.feed(bytes(bad))
        body.end()
        for c in (a, b):
            self.assertTrue(c.aborted())
            self.assertLess(len(c.body()), len(self.data))
        self.assertIsNone(self.rig.blob_file(self.digest))
        self.assertEqual(self.rig.temp_files(), [])

    def test_next_request_after_a_failure_starts_over(self):
        """
        A failed fill is forgotten: the next request goes upstream again and
        can succeed.
        """
        (a,), body = self.start(1)
        body.feed(b"\0" * len(self.data))
        body.end()
        again = self.rig.client(blob_path(self.digest))
        self.assertEqual(len(self.rig.upstream.calls), 2)
        good = FedBody(200, {b"Content-Length": [str(len(self.data)).encode()]})
        self.rig.upstream.answer(1, good)
        good.feed(self.data)
        good.end()
        self.assertEqual(again.body(), self.data)

    def test_upstream_death_mid_body_is_resumed_with_range(self):
        """
        A download that breaks mid-body asks upstream for the rest with
        Range, and the waiting clients see one continuous body.
        """
        (c,), body = self.start(1)
        body.feed(self.data[:MiB])
        body.die()
        name, digest, offset, _ = self.rig.upstream.calls[1]
        self.assertEqual(offset, MiB)
        rest = FedBody(206, {
            b"Content-Length": [str(len(self.data) - MiB).encode()],
            b"Content-Range": [f"bytes {MiB}-{len(self.data) - 1}/{len(self.data)}".encode()],
        })
        self.rig.upstream.answer(1, rest)
        rest.feed(self.data[MiB:])
        rest.end()
        self.assertEqual(c.body(), self.data)
        self.assertFalse(c.aborted())
        self.assertEqual(self.rig.blob_file(self.digest), self.data)

    def test_upstream_death_without_progress_aborts_clients(self):
        """
        When upstream keeps failing without sending a byte more, the fill
        gives up: clients are aborted and nothing is stored.
        """
        (c,), body = self.start(1)
        body.feed(self.data[:MiB])
        body.die()
        for i in range(1, 4):
            again = FedBody(206, {
                b"Content-Length": [str(len(self.data) - MiB).encode()],
                b"Content-Range": [f"bytes {MiB}-{len(self.data) - 1}/{len(self.data)}".encode()],
            })
            self.rig.upstream.answer(i, again)
            again.die()
        self.assertTrue(c.aborted())
        self.assertIsNone(self.rig.blob_file(self.digest))
        self.assertEqual(self.rig.temp_files(), [])

    def test_upstream_sending_too_much_is_refused(self):
        """
        More bytes than the announced length fail the fill.
        """
        (c,), body = self.start(1)
        body.feed(self.data + b"extra")
        body.end()
        self.assertTrue(c.aborted())
        self.assertIsNone(self.rig.blob_file(self.digest))

    def test_refused_response_gives_its_connection_up(self):
        """
        A response the fill refuses before reading its body (here a resume
        at the wrong place) is not left holding an upstream connection: its
        transport is stopped, and the resume that follows asks again.
        """
        (c,), body = self.start(1)
        body.feed(self.data[:MiB])
        body.die()
        wrong = FedBody(206, {b"Content-Range": [b"bytes 5-%d/%d" % (len(self.data) - 1, len(self.data))]})
        self.rig.upstream.answer(1, wrong)
        self.assertEqual(wrong.transport.producerState, "stopped")
        self.assertTrue(c.aborted())

    def test_unknown_blob_is_a_404(self):
        """
        An upstream 404 reaches the client as BLOB_UNKNOWN and nothing is
        cached.
        """
        c = self.rig.client(blob_path(self.digest))
        self.rig.upstream.missing(0)
        self.assertEqual(c.status(), 404)
        self.assertIn(b"BLOB_UNKNOWN", c.body())

    def test_cached_blob_needs_no_upstream(self):
        """
        Once stored, a blob is served from disk with no upstream call.
        """
        (c,), body = self.start(1)
        body.feed(self.data)
        body.end()
        again = self.rig.client(blob_path(self.digest))
        self.assertEqual(again.body(), self.data)
        self.assertEqual(len(self.rig.upstream.calls), 1)


class CommitFailureTests(SynchronousTestCase):
    def test_verified_readers_finish_when_the_commit_fails(self):
        """
        A blob whose bytes all matched but which cannot be made durable
        (fsync fails with EIO) is not cached, yet the clients already
        reading it, one of them still far behind, get every byte and a
        clean end; the next request downloads it again.
        """
        rig = Rig()
        data, digest = blob(3 * MiB, b"commit fails")

        def run(f, *args):
            if f == rig.store._commit_file:
                return fail(OSError(errno.EIO, "Input/output error"))
            return inline(f, *args)

        rig.store._run = run
        slow, fast = rig.client(blob_path(digest)), rig.client(blob_path(digest))
        body = FedBody(200, {b"Content-Length": [str(len(data)).encode()]})
        rig.upstream.answer(0, body)
        body.feed(data[:MiB])
        slow.slow_down()
        body.feed(data[MiB:])
        body.end()
        self.assertEqual(fast.body(), data)
        self.assertFalse(fast.aborted())
        slow.speed_up()
        self.assertEqual(slow.body(), data)
        self.assertFalse(slow.aborted())
        self.assertIsNone(rig.blob_file(digest))
        self.assertEqual(rig.temp_files(), [])
        self.assertEqual(rig.metrics.fills.labels("failed")._value.get(), 1)
        rig.client(blob_path(digest))
        self.assertEqual(len(rig.upstream.calls), 2)


class RoomTests(SynchronousTestCase):
    """
    A download paused while evicted files are being deleted is waiting on
    regcache, not on upstream: that wait is no stall.
    """

    def setUp(self):
        from regcache.expiry import Expiry

        self.rig = Rig()
        self.held = Deferring()
        expiry = Expiry(self.rig.store, 10_000, self.rig.reactor, self.rig.metrics)
        expiry.startService()
        self.addCleanup(expiry.stopService)
        for i in range(9):
            data, digest = blob(1000, b"old %d" % i)
            w = self.rig.store.new_writer(digest)
            w.write(data)
            w.commit()
            w.close()
        self.rig.store._run = self.held

    def test_idle_timer_stops_while_waiting_for_room(self):
        """
        However long the deletions take, the paused download is neither
        cut off nor resumed; once room is made it goes on with the same
        upstream response, and its idle timer runs again from then.
        """
        data, digest = blob(2000, b"new")
        c = self.rig.client(blob_path(digest))
        body = FedBody(200, {b"Content-Length": [b"2000"]})
        self.rig.upstream.answer(0, body)
        body.feed(data[:100])
        self.assertEqual(body.transport.producerState, "paused")
        idle = self.rig.upstream.idle
        self.rig.reactor.advance(idle * 3)
        self.assertEqual(body.transport.producerState, "paused")
        self.held.run_all()
        self.assertEqual(body.transport.producerState, "producing")
        body.feed(data[100:1000])
        self.rig.reactor.advance(idle + 1)
        self.assertEqual(body.transport.producerState, "stopped")
        self.assertEqual(len(self.rig.upstream.calls), 1)


class StoreFailureTests(SynchronousTestCase):
    def test_temp_file_refused_fails_the_waiters(self):
        """
        If the store cannot even create the temp file (disk full, no
        permission), every waiting client gets an error instead of hanging.
        """
        import errno

        rig = Rig()
        data, digest = blob(1000)

        def refuse(d):
            raise OSError(errno.ENOSPC, "No space left on device")

        rig.store.new_writer = refuse
        c = rig.client(blob_path(digest))
        self.assertEqual(c.status(), 503)
        self.assertEqual(rig.upstream.calls, [])


class Sha512Tests(SynchronousTestCase):
    def test_sha512_blob_is_verified_and_stored(self):
        """A blob named by a sha512 digest is hashed with sha512 while it streams, then stored."""
        import hashlib

        from regcache.reference import Digest

        rig = Rig()
        data = b"sha512 content " * 1000
        digest = Digest("sha512", hashlib.sha512(data).hexdigest())
        c = rig.client(blob_path(digest))
        body = FedBody(200, {b"Content-Length": [str(len(data)).encode()]})
        rig.upstream.answer(0, body)
        body.feed(data)
        body.end()
        self.assertEqual(c.body(), data)
        self.assertEqual(c.header("Docker-Content-Digest"), str(digest))
        self.assertEqual(rig.blob_file(digest), data)


class FillDrainTests(SynchronousTestCase):
    """
    Shutdown waits a grace period for downloads under way, then goes on:
    running out of time is expected, any other failure is logged.
    """

    class Fills:
        def __init__(self, drained):
            self.drained = drained

        def __len__(self):
            return 1

        def drain(self):
            return self.drained

    def stop(self, drained):
        from twisted.internet.task import Clock

        from regcache.inflight import FillDrain

        clock = Clock()
        service = FillDrain(self.Fills(drained), clock, grace=10.0)
        service.startService()
        return clock, service.stopService()

    def test_grace_running_out_stops_quietly(self):
        """A drain that outlasts the grace period lets shutdown go on, and logs no error."""
        from twisted.internet.defer import Deferred

        clock, stopped = self.stop(Deferred())
        self.assertNoResult(stopped)
        clock.advance(10.0)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_other_failure_is_logged(self):
        """A drain that fails for any other reason lets shutdown go on, and the failure is logged."""
        clock, stopped = self.stop(fail(RuntimeError("drain broke")))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
