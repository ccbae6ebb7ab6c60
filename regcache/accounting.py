# test-case-name: tests.test_accounting
"""
Pull accounting: how many counted pulls (manifest GETs) each upstream
credential has spent, and what the upstream last said is left.

Docker Hub counts pulls per account (or per address, anonymously) over a
window it names in its ``ratelimit-*`` headers; this module keeps the
same counts on regcache's side, so "how many pulls did we use" has an
answer even when those headers are absent.

Counts are kept in hourly buckets, so "the last 6 hours" is exact to the
hour (the current hour and the five before it), and only the last 24 hours
are kept.  They survive a restart: a small JSON file in the storage
directory, written whole (to a temporary name, then renamed) in the store's
thread runner every FLUSH_EVERY seconds when something changed and at
shutdown, and read once at start-up.  Accounts are what the config
declares (an upstream's member and its credential), never something a
client chose; their number is bounded all the same, by MAX_ACCOUNTS.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from regcache.headers import header, ratelimit

HOUR = 3600
#: Hours of counts kept (and written): what the status page shows.
HOURS = 24
#: The window "recent" figures cover, in hours.
RECENT = 6
#: Seconds between writes of the counts, when any changed.
FLUSH_EVERY = 10.0
#: Accounts kept: one per upstream member and credential, from the config.
MAX_ACCOUNTS = 256
#: The file under the storage directory.
FILENAME = "accounting.json"

#: The exchanges that count (regcache.metrics.UPSTREAM_KINDS names them all).
MANIFEST_GET, MANIFEST_HEAD = "manifest_get", "manifest_head"

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Usage:
    """
    One credential's use of one upstream member, as the status page and
    ``/status.json`` show it.  ``credential`` is the account name, or
    "anonymous"; ``hourly_pulls`` holds the last 24 hours' counted pulls,
    oldest first, the current hour last.  ``limit``, ``remaining``,
    ``window`` (seconds) and ``source`` are the upstream's last
    ``ratelimit-*`` headers, seen at ``seen``; None where it sent none.
    """

    upstream: str
    member: str
    credential: str
    pulls_6h: int = 0
    pulls_24h: int = 0
    heads_6h: int = 0
    blob_bytes_24h: int = 0
    hourly_pulls: List[int] = field(default_factory=lambda: [0] * 24)
    limit: Optional[int] = None
    remaining: Optional[int] = None
    window: Optional[int] = None
    source: Optional[str] = None
    seen: Optional[float] = None


@dataclass
class RateLimit:
    """The latest rate-limit headers an upstream member sent."""

    limit: Optional[int] = None
    remaining: Optional[int] = None
    window: Optional[int] = None
    source: Optional[str] = None
    seen: Optional[float] = None

    @classmethod
    def parse(cls, headers, now: float) -> Optional["RateLimit"]:
        """
        The ``ratelimit-limit: 100;w=21600``, ``ratelimit-remaining`` and
        ``docker-ratelimit-source`` of one answer (names matched without
        regard to case, as twisted Headers does), or None when it sent
        neither figure: an unlimited account, or not Docker Hub.
        """
        limit, window = ratelimit(headers, b"ratelimit-limit")
        remaining, rwindow = ratelimit(headers, b"ratelimit-remaining")
        if limit is None and remaining is None:
            return None
        source = header(headers, b"docker-ratelimit-source")
        return cls(limit, remaining, window or rwindow, source[:100] if source else None, now)


#: (upstream, member, credential)
Key = Tuple[str, str, str]


@dataclass
class _Account:
    #: hour number (seconds // HOUR) -> [pulls, heads, blob bytes]
    hours: Dict[int, List[int]] = field(default_factory=dict)
    ratelimit: Optional[RateLimit] = None


class Accounting:
    """
    The counts of every account, fed by upstream.py (``exchange``) and the
    blob fills (``blob_bytes``), read with ``snapshot``.  ``clock`` gives
    the time; ``path`` (a file) and ``run`` (the store's thread runner)
    make the counts persistent, and without them they live in memory only.
    """

    log = Logger()

    def __init__(self, clock, path: Optional[str] = None, run: Optional[Callable[..., Deferred]] = None,
                 capacity: int = MAX_ACCOUNTS):
        self.clock = clock
        self.path = path
        self.run = run
        self.capacity = capacity
        self._accounts: Dict[Key, _Account] = {}
        #: member (upstream, host) -> its credential, for the blob bytes
        #: a fill reports by member.
        self._credentials: Dict[Tuple[str, str], str] = {}
        self._dirty = False
        self._refused = False
        self._writing: Optional[Deferred] = None

    def _hour(self) -> int:
        return int(self.clock.seconds() // HOUR)

    def account(self, upstream: str, member: str, credential: str) -> Optional[_Account]:
        """
        The account of a member and credential, created on first use
        unless MAX_ACCOUNTS exist (then None, logged once).
        """
        key = (upstream, member, credential)
        self._credentials[upstream, member] = credential
        found = self._accounts.get(key)
        if found is None:
            if len(self._accounts) >= self.capacity:
                if not self._refused:
                    self._refused = True
                    self.log.warn("Pull accounting keeps {n} accounts at most: {key} is not counted",
                                  n=self.capacity, key="/".join(key))
                return None
            found = self._accounts[key] = _Account()
        return found

    def exchange(self, upstream: str, member: str, credential: str, kind: str, status: Optional[int],
                 ratelimit: Optional[RateLimit] = None) -> None:
        """
        One request upstream and its answer (``status`` None when none
        came), with the rate-limit headers it carried.  A manifest GET
        answered 2xx or 3xx is a counted pull, a manifest HEAD so answered a
        free check (the rate-limit probe's is neither: it only reads).
        """
        account = self.account(upstream, member, credential)
        if account is None:
            return
        if status is not None and 200 <= status < 400 and kind in (MANIFEST_GET, MANIFEST_HEAD):
            self._add(account, 0 if kind == MANIFEST_GET else 1, 1)
        if ratelimit is not None:
            account.ratelimit = ratelimit
            self._dirty = True

    def blob_bytes(self, upstream: str, member: str, n: int) -> None:
        """``n`` blob bytes received from a member."""
        credential = self._credentials.get((upstream, member), ANONYMOUS)
        account = self.account(upstream, member, credential)
        if account is not None:
            self._add(account, 2, n)

    def _add(self, account: _Account, column: int, n: int) -> None:
        hour = self._hour()
        row = account.hours.get(hour)
        if row is None:
            row = account.hours[hour] = [0, 0, 0]
            for old in [h for h in account.hours if h <= hour - HOURS]:
                del account.hours[old]
        row[column] += n
        self._dirty = True

    def snapshot(self) -> List[Usage]:
        """Every account's figures now, in a stable order."""
        now = self._hour()
        out = []
        for (upstream, member, credential), account in sorted(self._accounts.items()):
            rows = {h: r for h, r in account.hours.items() if h > now - HOURS}
            recent = [r for h, r in rows.items() if h > now - RECENT]
            rl = account.ratelimit or RateLimit()
            out.append(Usage(
                upstream, member, credential,
                pulls_6h=sum(r[0] for r in recent),
                pulls_24h=sum(r[0] for r in rows.values()),
                heads_6h=sum(r[1] for r in recent),
                blob_bytes_24h=sum(r[2] for r in rows.values()),
                hourly_pulls=[rows.get(h, (0,))[0] for h in range(now - HOURS + 1, now + 1)],
                limit=rl.limit, remaining=rl.remaining, window=rl.window, source=rl.source, seen=rl.seen,
            ))
        return out

    def ratelimit(self, upstream: str, member: str) -> Optional[RateLimit]:
        """The latest rate-limit headers of a member, whatever the credential."""
        credential = self._credentials.get((upstream, member))
        account = self._accounts.get((upstream, member, credential)) if credential else None
        return account.ratelimit if account else None

    # Persistence

    def _document(self) -> dict:
        first = self._hour() - HOURS + 1
        return {"version": 1, "accounts": [
            {"upstream": k[0], "member": k[1], "credential": k[2],
             "hours": {str(h): r for h, r in sorted(a.hours.items()) if h >= first},
             "ratelimit": a.ratelimit.__dict__ if a.ratelimit else None}
            for k, a in self._accounts.items()
        ]}

    def load(self) -> None:
        """
        Read the counts an earlier run wrote, at start-up (before the
        reactor runs, as the store's own start-up is).  A missing file is
        a first start; one that cannot be read is logged and started over,
        never a reason not to serve.
        """
        if self.path is None:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            first = self._hour() - HOURS + 1
            for entry in doc["accounts"][: self.capacity]:
                key = (str(entry["upstream"]), str(entry["member"]), str(entry["credential"]))
                account = self._accounts.setdefault(key, _Account())
                for h, row in entry["hours"].items():
                    if int(h) >= first:
                        account.hours[int(h)] = [int(n) for n in row[:3]]
                if entry.get("ratelimit"):
                    account.ratelimit = RateLimit(**entry["ratelimit"])
                self._credentials.setdefault(key[:2], key[2])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self._accounts.clear()
            self.log.warn("Pull accounting starts over: cannot read {path}: {error}", path=self.path, error=str(e))

    def flush(self) -> Deferred:
        """
        Write the counts if any changed since the last write, in the thread
        runner; one write at a time (a flush during one waits for it).
        """
        if self.path is None or self.run is None:
            return succeed(None)
        if self._writing is not None:
            waiting: Deferred = Deferred()
            self._writing.addBoth(lambda r: (waiting.callback(None), r)[1])
            return waiting.addCallback(lambda _: self.flush())
        if not self._dirty:
            return succeed(None)
        self._dirty = False
        d = self._writing = self.run(_write, self.path, json.dumps(self._document()))

        def written(result):
            self._writing = None
            return result

        def failed(failure):
            self._dirty = True
            self.log.warn("Cannot write the pull accounting to {path}: {error}",
                          path=self.path, error=failure.getErrorMessage())

        return d.addBoth(written).addErrback(failed)


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class AccountingFlush(Service):
    """Writes the counts every FLUSH_EVERY seconds, and once more at shutdown."""

    def __init__(self, accounting: Accounting, clock, every: float = FLUSH_EVERY):
        self.accounting = accounting
        self._loop = LoopingCall(accounting.flush)
        self._loop.clock = clock
        self.every = every

    def startService(self):
        super().startService()
        self._loop.start(self.every, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self.accounting.flush()
