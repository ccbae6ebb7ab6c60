# test-case-name: tests.test_singleflight
"""
Shared work by key: callers share one run and cancel alone, and a failure
nobody waits for still reaches the log.
"""

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from regcache.errors import UpstreamError
from regcache.singleflight import SingleFlight


class SingleFlightTests(SynchronousTestCase):
    def test_callers_share_work_but_cancel_alone(self):
        """
        Concurrent callers share one piece of work; one caller cancelling
        its Deferred leaves the work and the other callers alone.
        """
        work = []
        flight = SingleFlight()

        def start():
            d = Deferred()
            work.append(d)
            return d

        a = flight.run("k", start)
        b = flight.run("k", start)
        self.assertEqual(len(work), 1)
        a.cancel()
        self.failureResultOf(a, CancelledError)
        work[0].callback("result")
        self.assertEqual(self.successResultOf(b), "result")
        self.assertNotIn("k", flight)

    def test_failure_nobody_waits_for_is_logged(self):
        """
        Shared work that fails after every caller gave up is still logged:
        a warning naming the key and the error for an expected failure (an
        upstream error), and the traceback for anything else.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        flight = SingleFlight()
        works = {"down": Deferred(), "bug": Deferred()}
        for key, work in works.items():
            d = flight.run(key, lambda work=work: work)
            d.cancel()
            self.failureResultOf(d, CancelledError)
        works["down"].errback(UpstreamError("upstream answered 503", 503))
        works["bug"].errback(ZeroDivisionError("a bug"))
        logged = {e.get("key"): e for e in events}
        self.assertEqual(logged["'down'"]["log_level"], LogLevel.warn)
        self.assertEqual(logged["'down'"]["error"], "upstream answered 503")
        self.assertEqual(logged["'bug'"]["log_level"], LogLevel.critical)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertNotIn("down", flight)

    def test_failure_with_waiters_goes_to_them_only(self):
        """A failure some caller still waits for is that caller's to report, not logged here."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        flight = SingleFlight()
        work = Deferred()
        d = flight.run("k", lambda: work)
        work.errback(UpstreamError("gone"))
        self.failureResultOf(d, UpstreamError)
        self.assertEqual(len(events), 0)
