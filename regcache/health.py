# -*- test-case-name: tests.test_health -*-
"""
How one upstream registry is doing, remembered, so that a sick one costs
clients nothing: each Upstream (each member of a chain) has one Health,
which every request to it passes through.

**The circuit.**  A timeout or a refused connection, or a run of three
failures (5xx answers, connections that broke), opens it: nothing more is
sent to that registry until a probe is due, 1 s later at first, doubling to
30 s while probes keep failing.  Then one request at a time goes, as the
probe; the first that gets an answer closes the circuit.  A request held
back raises UpstreamHeld at once, so a cached tag stands in for it without
a wait (mirror.py), a chain asks its next member (chain.py), and a client
with nothing cached gets the reason in words at once.

**429s.**  Docker Hub has two (PROTOCOL.md §10).  The pull limit (its body
says "pull rate limit") counts only manifest GETs of one credential, so it
pauses only those, until the window the rate-limit headers name has room
again, or for the Retry-After; HEAD revalidations and blobs go on, and any
answer whose ``ratelimit-remaining`` shows room ends the pause early.  Any
other 429 is the abuse limit, which counts every request from the address:
it pauses every request to the registry, briefly (the Retry-After, else 2 s
doubling to 60 s).  Either way, after the pause one request probes.  Where
the window starts is regcache's own estimate (its first counted pull after
the last window ended): Hub's window rolls, and Docker calls its figures
best-effort too.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional

from twisted.logger import Logger

from regcache.errors import UpstreamError, UpstreamHeld, UpstreamTimeout, UpstreamUnreachable
from regcache.headers import RETRY_AFTER_RANGE
from regcache.remote import MemberHealth

#: How many failures in a row (of the kinds that are not at once decisive) open the circuit.
RUN = 3
#: The first wait for a probe, and the longest, in seconds.
PROBE_FIRST, PROBE_MAX = 1.0, 30.0
#: The abuse limit's pause without a Retry-After: first and longest.
ABUSE_FIRST, ABUSE_MAX = 2.0, 60.0
#: A pull-limit pause when neither Retry-After nor the headers say how long.
PULL_DEFAULT = 60.0

#: The values of regcache_upstream_circuit_state.
UP, FAILING, OPEN = 0, 1, 2


def span(seconds: float) -> str:
    """A wait as a person reads it: "4 s", "12 min", "3 h 12 min", "6 h"."""
    if seconds < 60:
        return f"{max(math.ceil(seconds), 1)} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


@dataclass
class _Gate:
    """Shut until ``until`` (None: open), then open to one probe at a time."""

    until: Optional[float] = None
    since: Optional[float] = None
    probing: bool = False
    #: Why it is shut, in words, for the held requests' errors.
    reason: str = ""
    #: The status a held request fails with (429 for a pause).
    status: Optional[int] = None

    def shut(self, now: float, wait: float, reason: str, status: Optional[int] = None) -> None:
        if self.until is None:
            self.since = now
        self.until, self.reason, self.status, self.probing = now + wait, reason, status, False

    def open(self) -> None:
        self.until = self.since = None
        self.probing = False


@dataclass
class Ticket:
    """One admitted request: whether Hub counts it as a pull, and the gates it probes."""

    counted: bool
    probes: List[_Gate] = field(default_factory=list)

    def done(self) -> None:
        for gate in self.probes:
            gate.probing = False
        self.probes.clear()


@dataclass
class _Window:
    """What the rate-limit headers said of the pull window, and where regcache thinks it started."""

    limit: Optional[int] = None
    window: Optional[float] = None
    start: Optional[float] = None

    def left(self, now: float) -> Optional[float]:
        if self.window is None or self.start is None:
            return None
        return self.start + self.window - now


class Health:
    """
    The circuit and the 429 pauses of one registry (``member``, named in
    errors as ``who``), with its state in the log and in the metrics'
    ``regcache_upstream_circuit_state{upstream, member}``.
    """

    log = Logger()

    def __init__(self, clock, who: str, upstream: str, member: str, metrics=None):
        self.clock = clock
        self.who = who
        self.member = member
        self.circuit = _Gate()
        self.abuse = _Gate()
        self.pulls = _Gate()
        self._failures = 0
        self._probe_wait = 0.0
        self._abuse_wait = 0.0
        self._window = _Window()
        self._gauge = metrics.circuit_state.labels(upstream, member) if metrics is not None else None
        self._show()

    # Before a request

    def admit(self, counted: bool) -> Ticket:
        """
        A Ticket for a request (``counted``: a manifest GET), or
        UpstreamHeld if a gate holds it back: shut, or already probed by
        another request.
        """
        now = self.clock.seconds()
        ticket = Ticket(counted)
        for gate in (self.circuit, self.abuse, self.pulls) if counted else (self.circuit, self.abuse):
            if gate.until is None:
                continue
            if now < gate.until or gate.probing:
                ticket.done()
                left = gate.until - now
                when = f"not asked again for {span(left)}" if left > 0 else "a probe is under way"
                raise UpstreamHeld(f"{gate.reason}; {when}", gate.status,
                                   retry_after=max(left, RETRY_AFTER_RANGE[0]) if gate.status == 429 else None)
            gate.probing = True
            ticket.probes.append(gate)
        return ticket

    # After it

    def answered(self, ticket: Ticket) -> None:
        """Upstream answered (anything but a 5xx or a 429): it is up, and a counted answer means pulls may go."""
        ticket.done()
        self._failures = 0
        self._probe_wait = 0.0
        if self.circuit.until is not None:
            self.log.info("{who} answered again: circuit closed after {took:.1f}s open",
                          who=self.who, took=self.clock.seconds() - self.circuit.since)
            self.circuit.open()
        if self.abuse.until is not None:
            self.log.info("{who} answered again: its abuse-limit pause is over", who=self.who)
            self.abuse.open()
            self._abuse_wait = 0.0
        if ticket.counted:
            self._pulls_resume("a manifest GET was answered")
        self._show()

    def failed(self, ticket: Ticket, error: UpstreamError) -> None:
        """
        The exchange failed as an outage does.  A timeout, a refused
        connection or a failed probe opens the circuit at once; other
        failures do after a run of RUN.
        """
        ticket.done()
        now = self.clock.seconds()
        self._failures += 1
        decisive = isinstance(error, (UpstreamTimeout, UpstreamUnreachable)) or self.circuit.until is not None
        if decisive or self._failures >= RUN:
            self._probe_wait = min(max(self._probe_wait * 2, PROBE_FIRST), PROBE_MAX)
            was_open = self.circuit.until is not None
            self.circuit.shut(now, self._probe_wait, str(error))
            self.log.warn("{who}: {how} ({error}); no requests to it for {wait:g}s, then one probe",
                          who=self.who, how="probe failed" if was_open else "circuit open",
                          error=str(error), wait=self._probe_wait)
        self._show()

    def released(self, ticket: Ticket) -> None:
        """The request was given up before it taught anything (its client left)."""
        ticket.done()

    def limited(self, ticket: Ticket, pull_limit: bool, retry_after: Optional[float]) -> UpstreamError:
        """
        Upstream answered 429: pause what it asks to be paused, and return
        the error in words.  ``retry_after`` is already clamped
        (headers.retry_after).
        """
        ticket.done()
        now = self.clock.seconds()
        if self.circuit.until is not None:
            self.circuit.open()
        self._failures = 0
        if pull_limit:
            left = self._window.left(now)
            wait = retry_after or (left if left is not None and left > 0 else PULL_DEFAULT)
            wait = min(max(wait, RETRY_AFTER_RANGE[0]), RETRY_AFTER_RANGE[1])
            w = self._window
            if w.limit is not None and w.window is not None:
                words = (f"{self.who} is rate limiting: your pull limit of {w.limit} per {span(w.window)} "
                         f"is used up; {span(wait)} left in the window")
            else:
                words = f"{self.who} is rate limiting: the pull limit is used up; {span(wait)} left in the window"
            self.pulls.shut(now, wait, words, 429)
            self.log.warn("{who}: pull limit reached; manifest GETs paused for {wait:g}s (HEADs and blobs go on)",
                          who=self.who, wait=wait)
        else:
            self._abuse_wait = min(max(self._abuse_wait * 2, ABUSE_FIRST), ABUSE_MAX)
            wait = retry_after or self._abuse_wait
            words = f"{self.who} is rate limiting every request (a 429 without a pull-limit message)"
            self.abuse.shut(now, wait, words, 429)
            self.log.warn("{who}: bare 429 (abuse limit); every request paused for {wait:g}s",
                          who=self.who, wait=wait)
        self._show()
        return UpstreamError(f"{words}; not asked again for {span(wait)}", 429, retry_after=wait)

    def observe(self, limit: Optional[int], remaining: Optional[int], window: Optional[float],
                counted: bool) -> None:
        """
        What an answer's rate-limit headers said.  A counted pull after the
        last window ended starts the next; room shown on any answer ends a
        pull-limit pause.
        """
        now = self.clock.seconds()
        w = self._window
        if limit is not None:
            w.limit = limit
        if window:
            w.window = min(float(window), RETRY_AFTER_RANGE[1])
        left = w.left(now)
        if counted and (left is None or left <= 0):
            w.start = now
        if remaining is not None and remaining > 0:
            self._pulls_resume(f"it shows {remaining} pulls left")

    def _pulls_resume(self, why: str) -> None:
        if self.pulls.until is not None:
            self.log.info("{who}: pull-limit pause over: {why}", who=self.who, why=why)
            self.pulls.open()
            self._show()

    # What it looks like

    @property
    def open(self) -> bool:
        """Whether the circuit is open (a probe may be due)."""
        return self.circuit.until is not None

    def state(self) -> MemberHealth:
        """
        For the status page: an open circuit stays "open" until a probe
        gets an answer; a pause shows only while it lasts, since the next
        request is then free to probe.
        """
        if self.circuit.until is not None:
            return MemberHealth(self.member, "open", self.circuit.reason, self.circuit.since, self.circuit.until)
        now = self.clock.seconds()
        for gate in (self.abuse, self.pulls):
            if gate.until is not None and gate.until > now:
                return MemberHealth(self.member, "rate limited", gate.reason, gate.since, gate.until)
        if self._failures:
            return MemberHealth(self.member, "failing", f"{self._failures} failure(s) in a row")
        return MemberHealth(self.member, "up")

    def _show(self) -> None:
        if self._gauge is not None:
            self._gauge.set(OPEN if self.circuit.until is not None else FAILING if self._failures else UP)
