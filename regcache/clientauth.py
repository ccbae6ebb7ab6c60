# test-case-name: tests.test_clientauth,tests.integration.test_clientauth_proc
"""
Who a client is: the one module that reads client credentials, and turns
each request into an Identity (regcache.identity) or a 401 with the Basic
challenge.

A mirror that holds registry credentials must not be a free proxy to them
on a public ingress, so when authentication is on a client needs a valid
user and password from an htpasswd file, unless it comes from a trusted
network (dockerd never sends credentials to a mirror, so cluster nodes must
be let in by address) or ``anonymous`` lets it in: ``cached-only`` serves it
what the cache holds and never lets it make regcache contact an upstream.

Passwords are checked with the ``bcrypt`` library, in a small pool of their
own so the reactor never waits for one; a check that succeeded is kept for
a minute, so a pull of fifty blobs costs one bcrypt.  Failed logins are
logged (user and address, never the password), counted, and an address that
keeps failing is answered 429 for a growing while, without a check (a
login that passed within the minute still gets in).  Every
table here is keyed by what clients send, and each has a bound.
"""

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import bcrypt
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from regcache.config import ConfigError
from regcache.errors import RegistryError
from regcache.identity import EVERYONE, Identity
from regcache.logs import printable
from regcache.singleflight import SingleFlight

#: A bcrypt entry as ``htpasswd -B`` writes it: $2y$, the cost, 53 characters of salt and hash.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")

#: bcrypt reads no further than this; htpasswd hashed no more of it either.
_BCRYPT_MAX = 72

#: How long a successful check stands, and how many are kept.
CACHE_SECONDS = 60
CACHE_ENTRIES = 1024

#: Checks queued or running at once; past it a login is answered 503.
MAX_CHECKS = 16

#: Failures from one address, each within this many seconds of the last
#: (or of the end of its wait), before the address waits; the wait doubles
#: with each further failure, up to MAX_WAIT.
MAX_FAILURES = 5
FAILURE_WINDOW = 60
FIRST_WAIT = 5
MAX_WAIT = 300

#: Addresses whose failures are remembered; the least recently failed go first.
FAILURE_ADDRESSES = 10000

#: The htpasswd file is at most this large: a bigger one is a mistake.
MAX_FILE = 16 * 1024 * 1024

#: How often the htpasswd file's mtime is checked, off the reactor.
WATCH_SECONDS = 5


@dataclass(frozen=True)
class Users:
    """
    An htpasswd file as loaded: each user's bcrypt hash, a hash of the same
    cost to check unknown users against (so a wrong name takes as long as a
    wrong password), and the file's identity when it was read.
    """

    hashes: Dict[str, bytes]
    decoy: bytes
    stamp: Tuple[int, int, int]


def read_users(path: str) -> Users:
    """
    Load an htpasswd file of bcrypt entries, or raise a ConfigError naming
    the file and line at fault.  Blocking: run it at start-up or in a
    thread.  Any other kind of entry (apr1, SHA-1, crypt, plain) is
    refused here rather than half-supported: bcrypt is the one htpasswd
    format a maintained library checks safely.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise ConfigError(f"htpasswd: cannot read {path!r}: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise ConfigError(f"htpasswd {path}: larger than {MAX_FILE // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"htpasswd {path}: not UTF-8 text") from None
    hashes: Dict[str, bytes] = {}
    costs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise ConfigError(f"htpasswd {path}:{n}: not a user:hash line")
        m = _BCRYPT_RE.fullmatch(hashed)
        if m is None:
            raise ConfigError(f"htpasswd {path}:{n}: user {user[:64]!r}: not a bcrypt entry "
                              "(regcache checks bcrypt only: create the entry with htpasswd -B)")
        if user in hashes:
            raise ConfigError(f"htpasswd {path}:{n}: user {user[:64]!r} is listed twice")
        hashes[user] = hashed.encode("ascii")
        costs.append(int(m.group(1)))
    cost = min(max(costs[0] if costs else 5, 4), 31)
    decoy = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(rounds=cost))
    return Users(hashes, decoy, (st.st_ino, st.st_size, st.st_mtime_ns))


def _verify(hashed: bytes, password: bytes) -> bool:
    return bcrypt.checkpw(password[:_BCRYPT_MAX], hashed)


def client_ip(text: str):
    """
    An address as ipaddress parses it, an IPv4-mapped IPv6 one as IPv4 (a
    dual-stack listener's view of an IPv4 client; config.parse_networks
    maps networks alike, so one rule matches both ways); None if it is none.
    """
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def within(address, networks) -> bool:
    return address is not None and any(address in n for n in networks)


def client_address(peer: Optional[str], forwarded, proxies):
    """
    The address regcache believes a request came from: the direct peer,
    unless the peer is a trusted proxy, and then the right-most address of
    X-Forwarded-For (``forwarded``: the header's values, in order) that is
    not itself a trusted proxy.  Whatever lies left of that was written by
    the client and proves nothing; an entry that is no address stops the
    walk at the proxy that passed it on.  None for a peer with no IP
    address (a unix socket).
    """
    address = client_ip(peer) if peer else None
    if not within(address, proxies):
        return address
    hops = [h for value in forwarded for h in value.decode("latin-1").split(",")]
    for hop in reversed(hops):
        hop_address = client_ip(hop)
        if hop_address is None:
            return address
        address = hop_address
        if not within(address, proxies):
            return address
    return address


class _Bounded(OrderedDict):
    """An OrderedDict that forgets its least recently set entries past ``size``."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value) -> None:
        self.pop(key, None)
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass
class _Failures:
    count: int
    last: float
    until: float = 0.0


def _bucket(address: str) -> str:
    """
    The client a throttle counts an address as: an IPv6 address as its /64,
    which one host or LAN is given whole (RFC 6177), so that rotating
    through it buys no fresh tries; an IPv4 address (or "local") as itself.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return address


class Throttle:
    """
    Failed logins per address (an IPv6 one per /64): after MAX_FAILURES in
    close succession an address waits FIRST_WAIT seconds, twice that after the next failure,
    and so on up to MAX_WAIT; a quiet FAILURE_WINDOW after its last failure
    or wait forgets it.  A password guesser gets a handful of tries a
    minute, then a few an hour.  Successes reset nothing, so a guesser's own
    valid account cannot buy it fresh tries at another's.
    """

    def __init__(self, clock, size: int = FAILURE_ADDRESSES):
        self.clock = clock
        self._by_address = _Bounded(size)
        #: Checks under way per address: at most MAX_CHECKS in all.
        self._under_way: Dict[str, int] = {}

    def room(self, address) -> bool:
        """
        Whether another check may start for ``address``: it may have as many
        under way as failures it has left before it waits (one once it has
        waited), or a burst of guesses sent at once would all be checked
        before the first failure counts.
        """
        bucket = _bucket(address)
        record = self._current(bucket)
        left = max(MAX_FAILURES - (record.count if record else 0), 1)
        return self._under_way.get(bucket, 0) < left

    def checking(self, address) -> Callable[[], None]:
        """Count a check of ``address`` as under way until the returned call."""
        bucket = _bucket(address)
        self._under_way[bucket] = self._under_way.get(bucket, 0) + 1

        def done() -> None:
            left = self._under_way[bucket] - 1
            if left:
                self._under_way[bucket] = left
            else:
                del self._under_way[bucket]

        return done

    def wait(self, address) -> float:
        """Seconds ``address`` must still wait before its next login is checked, 0 for none."""
        record = self._current(_bucket(address))
        return max(record.until - self.clock.seconds(), 0.0) if record else 0.0

    def failed(self, address) -> None:
        address = _bucket(address)
        now = self.clock.seconds()
        record = self._current(address) or _Failures(0, now)
        record.count += 1
        record.last = now
        if record.count >= MAX_FAILURES:
            record.until = now + min(FIRST_WAIT * 2 ** (record.count - MAX_FAILURES), MAX_WAIT)
        self._by_address.put(address, record)

    def __len__(self) -> int:
        return len(self._by_address)

    def _current(self, address) -> Optional[_Failures]:
        record = self._by_address.get(address)
        if record is not None and self.clock.seconds() - max(record.last, record.until) > FAILURE_WINDOW:
            del self._by_address[address]
            return None
        return record


def challenge(message: str) -> RegistryError:
    """The 401 a client answers with credentials (the routes add ``WWW-Authenticate: Basic``)."""
    return RegistryError("UNAUTHORIZED", message, status=401)


def _basic(header: Optional[bytes]):
    """
    (user, password) of a Basic Authorization header; None for no header,
    another scheme (that client is asked for Basic like one that sent
    nothing) or an empty login (``:``, what containers/image sends after a
    challenge when it has no credentials); ValueError for a Basic one that
    cannot be read.
    """
    if header is None:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if decoded == b":":
        return None
    user, colon, password = decoded.partition(b":")
    if not colon or not user:
        raise ValueError("not user:password")
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        raise ValueError("user name not UTF-8") from None


class Gate:
    """
    Turns a request into an Identity, or refuses it.  ``settings`` is a
    config.AuthSettings, or None when authentication is off: then every
    request is EVERYONE.  ``run(f, *args)`` runs ``f`` in the gate's own
    thread pool and returns a Deferred.
    """

    log = Logger()

    def __init__(self, settings, clock, run, metrics):
        self.settings = settings
        self.clock = clock
        self.run = run
        self.metrics = metrics
        self.users = read_users(settings.htpasswd) if settings and settings.htpasswd else None
        self.throttle = Throttle(clock)
        # Keyed by an HMAC of user and password under a key of this process:
        # nothing that could be looked up elsewhere sits in memory.
        self._key = os.urandom(32)
        self._passed = _Bounded(CACHE_ENTRIES)
        self._checks = SingleFlight()
        self._checking = 0

    # Identities

    async def identify(self, request, ping: bool = False) -> Identity:
        """
        ``ping`` is the ``/v2/`` check clients make first.  A stranger
        without credentials is challenged there whatever ``anonymous``
        says: skopeo, podman and dockerd send credentials only after a
        challenge there, and one without any carries on regardless (with
        an empty Basic login, taken as none).
        """
        settings = self.settings
        if settings is None:
            return EVERYONE
        peer = getattr(request.getClientAddress(), "host", None)
        ip = client_address(peer, request.requestHeaders.getRawHeaders(b"x-forwarded-for", []),
                            settings.trusted_proxies)
        address = str(ip) if ip is not None else "local"
        trusted = within(ip, settings.trusted_networks)
        try:
            credentials = _basic(request.getHeader(b"authorization"))
        except ValueError as e:
            raise self._failed(address, None, "malformed", str(e))
        if credentials is None:
            if ping and not trusted:
                raise challenge("authentication required")
            if trusted or settings.anonymous == "allow":
                return Identity(trusted=trusted, address=address)
            if settings.anonymous == "cached-only":
                return Identity(address=address, may_fetch=False)
            raise challenge("authentication required")
        user = await self._check(address, *credentials)
        return Identity(user, self.groups_of(user), trusted, address)

    def groups_of(self, user: str) -> FrozenSet[str]:
        return frozenset(g for g, users in self.settings.groups.items() if user in users)

    async def _check(self, address: str, user: str, password: bytes) -> str:
        # A login that passed moments ago is let in before the throttle is
        # asked: only its password reaches the entry, so it gives a guesser
        # nothing, while a guesser's failures from the same address (a NAT,
        # a proxy not configured as one) must not lock its owner out.
        key = hmac.new(self._key, user.encode("utf-8") + b":" + password, hashlib.sha256).digest()
        passed = self._passed.get(key)
        if passed is not None and passed > self.clock.seconds():
            return user
        wait = self.throttle.wait(address)
        if wait or (key not in self._checks and not self.throttle.room(address)):
            self.metrics.client_auth_failures.labels("throttled").inc()
            raise RegistryError("TOOMANYREQUESTS", "too many failed logins from this address: try again later",
                                headers={"Retry-After": str(int(wait) + 1)})
        users = self.users
        hashed = users.hashes.get(user) if users else None
        if key not in self._checks and self._checking >= MAX_CHECKS:
            self.metrics.client_auth_failures.labels("busy").inc()
            raise RegistryError("UNAVAILABLE", "too many logins are being checked: try again", status=503,
                                headers={"Retry-After": "1"})
        ok = await self._checks.run(key, lambda: self._counted(
            address, self.run(_verify, hashed if hashed else users.decoy, password) if users else succeed(False)))
        if ok and hashed is not None:
            self._passed.put(key, self.clock.seconds() + CACHE_SECONDS)
            return user
        raise self._failed(address, user, "bad_password" if hashed is not None else "unknown_user")

    def _counted(self, address: str, d: Deferred) -> Deferred:
        self._checking += 1
        ended = self.throttle.checking(address)

        def done(result):
            self._checking -= 1
            ended()
            return result

        return d.addBoth(done)

    def _failed(self, address: str, user: Optional[str], reason: str, detail: str = "") -> RegistryError:
        """Count, log and slow down a failed login; the client's 401 to raise."""
        self.throttle.failed(address)
        self.metrics.client_auth_failures.labels(reason).inc()
        self.log.warn("Failed login for {user} from {address}: {reason}{detail}",
                      user=printable(user[:64]) if user is not None else "-", address=address, reason=reason,
                      detail=f" ({detail})" if detail else "")
        return challenge("bad credentials")

    # The htpasswd file

    def reload(self) -> Deferred:
        """
        Re-read the htpasswd file off the reactor.  Fires with True once the
        new users are in force (every cached check is forgotten with the old
        ones), or fails with the ConfigError saying why the file was
        refused, and the users in force stay.  Fires with False when there
        is no file to read: authentication off, or trusted networks only.
        """
        if self.settings is None or self.settings.htpasswd is None:
            return succeed(False)
        d = self.run(read_users, self.settings.htpasswd)

        def loaded(users: Users) -> bool:
            self.users = users
            self._passed.clear()
            self.log.info("Loaded {n} users from {path}", n=len(users.hashes), path=self.settings.htpasswd)
            return True

        return d.addCallback(loaded)

    def check_file(self) -> Deferred:
        """
        Reload the htpasswd file if it changed since it was read (its inode,
        size or mtime), checked with a stat off the reactor.  For a
        TimerService: it never fails, it logs.
        """
        d = self.run(_stamp, self.settings.htpasswd)

        def compare(stamp):
            if stamp != self.users.stamp:
                return self.reload()

        def refused(failure):
            self.log.error("Keeping the users already loaded: {error}", error=failure.getErrorMessage())

        return d.addCallback(compare).addErrback(refused)


def _stamp(path: str) -> Tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns
