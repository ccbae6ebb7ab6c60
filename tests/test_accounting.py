# test-case-name: tests.test_accounting
"""
Pull accounting: hourly buckets exact to the hour, the last 6 and 24 hours,
persistence across a restart, and its bounds.
"""

import json
import os
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from regcache.accounting import FILENAME, HOUR, Accounting, AccountingFlush, RateLimit
from tests.support import inline

HUB = ("docker.io", "registry-1.docker.io", "ci")


def pulls(accounting, n=1):
    for _ in range(n):
        accounting.exchange(*HUB, "manifest_get", 200)


def usage(accounting):
    (only,) = accounting.snapshot()
    return only


class BucketTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        # Mid-hour, so that a step of an hour crosses exactly one boundary.
        self.clock.advance(1000 * HOUR + HOUR / 2)
        self.accounting = Accounting(self.clock)

    def test_only_answered_manifest_gets_are_pulls(self):
        """A manifest GET answered below 400 is a pull, a HEAD a free check; refusals, failures and blobs are neither."""
        pulls(self.accounting, 3)
        self.accounting.exchange(*HUB, "manifest_get", 429)
        self.accounting.exchange(*HUB, "manifest_get", None)
        self.accounting.exchange(*HUB, "manifest_head", 200)
        self.accounting.exchange(*HUB, "manifest_head", 404)
        self.accounting.exchange(*HUB, "blob", 200)
        self.accounting.exchange(*HUB, "probe", 200)
        u = usage(self.accounting)
        self.assertEqual((u.pulls_6h, u.pulls_24h, u.heads_6h), (3, 3, 1))

    def test_hours_roll_over(self):
        """Each hour's pulls land in their own bucket, the current hour last, oldest first."""
        pulls(self.accounting, 2)
        self.clock.advance(HOUR)
        pulls(self.accounting, 5)
        hourly = usage(self.accounting).hourly_pulls
        self.assertEqual(len(hourly), 24)
        self.assertEqual(hourly[-2:], [2, 5])
        self.assertEqual(sum(hourly), 7)

    def test_six_and_twenty_four_hours_are_exact_to_the_hour(self):
        """The last 6 hours are the current hour and the five before it; 24 likewise; older hours drop out."""
        for hour in range(30):
            pulls(self.accounting, hour + 1)
            self.accounting.blob_bytes("docker.io", "registry-1.docker.io", 10)
            self.clock.advance(HOUR)
        self.clock.advance(-HOUR)  # back inside the last hour counted
        u = usage(self.accounting)
        self.assertEqual(u.pulls_6h, sum(range(25, 31)))
        self.assertEqual(u.pulls_24h, sum(range(7, 31)))
        self.assertEqual(u.hourly_pulls, list(range(7, 31)))
        self.assertEqual(u.blob_bytes_24h, 240)

    def test_a_quiet_day_empties_the_counts(self):
        """A day after the last pull, every figure is back to zero."""
        pulls(self.accounting, 9)
        self.clock.advance(24 * HOUR)
        u = usage(self.accounting)
        self.assertEqual((u.pulls_6h, u.pulls_24h, sum(u.hourly_pulls)), (0, 0, 0))

    def test_rows_kept_are_bounded_to_a_day(self):
        """However long it runs, an account keeps at most 24 hourly rows."""
        for _ in range(100):
            pulls(self.accounting)
            self.clock.advance(HOUR)
        pulls(self.accounting)
        (account,) = self.accounting._accounts.values()
        self.assertLessEqual(len(account.hours), 24)

    def test_accounts_are_bounded(self):
        """Past its capacity, new accounts are not counted (and say so once), while known ones still are."""
        accounting = Accounting(self.clock, capacity=2)
        for i in range(5):
            accounting.exchange("docker.io", f"m{i}", "ci", "manifest_get", 200)
        accounting.exchange("docker.io", "m0", "ci", "manifest_get", 200)
        self.assertEqual([(u.member, u.pulls_6h) for u in accounting.snapshot()], [("m0", 2), ("m1", 1)])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_blob_bytes_go_to_the_members_credential(self):
        """A fill reports bytes by member; they are filed under the credential that member uses."""
        pulls(self.accounting)
        self.accounting.blob_bytes("docker.io", "registry-1.docker.io", 1234)
        self.assertEqual(usage(self.accounting).blob_bytes_24h, 1234)

    def test_latest_ratelimit_is_kept(self):
        """The last rate-limit figures a member sent are the ones shown, with their window and source."""
        for remaining in (90, 89):
            seen = RateLimit.parse(Headers({b"RateLimit-Limit": [b"100;w=21600"],
                                            b"ratelimit-remaining": [b"%d;w=21600" % remaining],
                                            b"docker-ratelimit-source": [b"10.0.0.1"]}), self.clock.seconds())
            self.accounting.exchange(*HUB, "manifest_get", 200, seen)
        u = usage(self.accounting)
        self.assertEqual((u.limit, u.remaining, u.window, u.source, u.seen), (100, 89, 21600, "10.0.0.1",
                                                                              self.clock.seconds()))

    def test_answers_without_ratelimit_headers_keep_nothing(self):
        """No figures (an unlimited account, another registry) parse to None, and garbage too."""
        self.assertIsNone(RateLimit.parse(Headers({}), 0))
        self.assertIsNone(RateLimit.parse(Headers({b"ratelimit-limit": [b"lots"]}), 0))
        self.assertEqual(RateLimit.parse(Headers({b"ratelimit-remaining": [b"7"]}), 5),
                         RateLimit(None, 7, None, None, 5))


class PersistenceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(2000 * HOUR + 10)
        self.path = os.path.join(tempfile.mkdtemp(prefix="regcache-accounting-"), FILENAME)

    def make(self, run=inline):
        accounting = Accounting(self.clock, self.path, run)
        accounting.load()
        return accounting

    def test_counts_survive_a_restart(self):
        """What one run counted in the last 24 hours, the next run reads back, figures and rate limit alike."""
        first = self.make()
        pulls(first, 4)
        self.clock.advance(HOUR)
        pulls(first, 2)
        first.exchange(*HUB, "manifest_head", 200, RateLimit(100, 94, 21600, "ci-id", self.clock.seconds()))
        self.successResultOf(first.flush())
        second = self.make()
        self.assertEqual(second.snapshot(), first.snapshot())
        self.assertEqual(usage(second).pulls_6h, 6)
        self.assertEqual(usage(second).remaining, 94)

    def test_old_hours_are_not_read_back(self):
        """A file from more than a day ago gives no counts."""
        first = self.make()
        pulls(first, 4)
        self.successResultOf(first.flush())
        self.clock.advance(25 * HOUR)
        self.assertEqual(usage(self.make()).pulls_24h, 0)

    def test_the_file_holds_only_a_day(self):
        """The file written keeps at most 24 hourly rows per account."""
        accounting = self.make()
        for _ in range(40):
            pulls(accounting)
            self.clock.advance(HOUR)
            self.successResultOf(accounting.flush())
        with open(self.path) as f:
            (entry,) = json.load(f)["accounts"]
        self.assertLessEqual(len(entry["hours"]), 24)

    def test_a_damaged_file_starts_over(self):
        """A file that cannot be read is logged and ignored: regcache still starts, counting from zero."""
        with open(self.path, "w") as f:
            f.write("{not json")
        accounting = self.make()
        self.assertEqual(accounting.snapshot(), [])
        pulls(accounting)
        self.assertEqual(usage(accounting).pulls_6h, 1)

    def test_writes_go_through_the_thread_runner_one_at_a_time(self):
        """The file is written by ``run`` (off the reactor), never twice at once, and only when something changed."""
        calls = []

        def run(f, *args):
            d = Deferred()
            calls.append((f, args, d))
            return d

        accounting = self.make(run)
        self.successResultOf(accounting.flush())
        self.assertEqual(calls, [])
        pulls(accounting)
        first = accounting.flush()
        pulls(accounting)
        second = accounting.flush()
        self.assertEqual(len(calls), 1)
        f, args, d = calls[0]
        f(*args)
        d.callback(None)
        self.successResultOf(first)
        self.assertEqual(len(calls), 2)
        f, args, d = calls[1]
        f(*args)
        d.callback(None)
        self.successResultOf(second)
        with open(self.path) as fh:
            self.assertEqual(json.load(fh)["accounts"][0]["hours"], {str(int(self.clock.seconds() // HOUR)): [2, 0, 0]})

    def test_a_failed_write_is_retried(self):
        """A write that fails is logged, and the next flush writes again."""
        accounting = self.make(lambda f, *a: inline(_raise))
        pulls(accounting)
        self.successResultOf(accounting.flush())
        self.assertTrue(accounting._dirty)

    def test_the_service_flushes_periodically_and_at_stop(self):
        """The flush service writes every 10 s while counts change, and once more when it stops."""
        accounting = self.make()
        service = AccountingFlush(accounting, self.clock)
        service.startService()
        pulls(accounting)
        self.clock.advance(10)
        self.assertEqual(usage(self.make()).pulls_6h, 1)
        pulls(accounting)
        self.successResultOf(service.stopService())
        self.assertEqual(usage(self.make()).pulls_6h, 2)


def _raise():
    raise OSError(28, "No space left on device")
