# test-case-name: tests.test_redis_leases,tests.integration.test_leases_proc
"""
Leases in Redis instead of the bucket (``--redis redis://host:port``): the
same table as regcache.leases.BucketTable, for clusters that have a Redis
and would rather not write a small object per cold blob.

A lease is ``SET key value NX PX ttl``: Redis expires a dead holder's lease
itself, so a key that exists is live.  The value is the lease's JSON, and
it is its own "ETag": renewing and releasing are Lua scripts that change or
delete the key only while it still holds the value this replica wrote, so a
lease another replica took meanwhile is never touched.

While Redis is down txredisapi's commands wait silently for a reconnection;
the coordinator's deadline on every call (regcache.leases) is what turns
that into a fetch alone.  txredisapi reaches for Twisted's global reactor
itself, as the one client here that does.
"""

from typing import Optional, Tuple
from urllib.parse import urlsplit

from regcache.leases import Lease, lease_name
from regcache.reference import Digest
from regcache.s3 import StorageError

#: Set the lease to ARGV[2] for ARGV[3] ms, if it is still ARGV[1].
RENEW = """
if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("set", KEYS[1], ARGV[2], "PX", ARGV[3])
end
return false
"""

#: Delete the lease, if it is still ARGV[1].
RELEASE = """
if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("del", KEYS[1])
end
return 0
"""


def connect(url: str, timeout: float):
    """A txredisapi connection (reconnecting, lazily) to the ``redis://host:port/db`` in ``url``."""
    import txredisapi

    parts = urlsplit(url)
    db = int(parts.path.strip("/")) if parts.path.strip("/").isdigit() else None
    return txredisapi.lazyConnection(parts.hostname or "localhost", parts.port or 6379, dbid=db, reconnect=True,
                                     password=parts.password, connectTimeout=timeout, replyTimeout=timeout)


class RedisTable:
    """The lease table in Redis; ``redis`` a txredisapi connection, keys under ``prefix``."""

    def __init__(self, redis, ttl: float, prefix: str = "regcache:"):
        self.redis = redis
        self.ttl_ms = max(1, int(ttl * 1000))
        self.prefix = prefix

    def _key(self, digest: Digest) -> str:
        return self.prefix + lease_name(digest)

    async def _call(self, what: str, command, *args):
        try:
            return await command(*args)
        except Exception as e:  # txredisapi raises its own errors, and Twisted's connection errors
            raise StorageError(f"Redis failed {what}: {type(e).__name__}: {e}")

    async def take(self, digest: Digest, mine: Lease) -> Tuple[Optional[str], Optional[Lease], str]:
        """As BucketTable.take: (mine's tag if it is the lease, else the live holder's lease, how)."""
        key = self._key(digest)
        value = mine.encode().decode()
        for _ in range(3):
            if await self._call("SET NX", self.redis.set, key, value, None, self.ttl_ms, True):
                return value, None, "won"
            current = await self._call("GET", self.redis.get, key)
            if current is None:
                continue  # expired or given up meanwhile: create it again
            theirs = Lease.decode(current.encode() if isinstance(current, str) else current)
            if theirs is not None and theirs.holder != mine.holder:
                return None, theirs, "lost"
            # Garbled, or a past life's of this replica: taken over in place.
            if await self._call("EVAL", self.redis.eval, RENEW, [key], [current, value, self.ttl_ms]):
                return value, None, "taken_over"
        raise StorageError(f"the lease on {digest} changed hands too often to be taken")

    async def renew(self, digest: Digest, lease: Lease, tag: str) -> Optional[str]:
        value = lease.encode().decode()
        done = await self._call("EVAL", self.redis.eval, RENEW, [self._key(digest)], [tag, value, self.ttl_ms])
        return value if done else None

    async def release(self, digest: Digest, tag: str) -> None:
        await self._call("EVAL", self.redis.eval, RELEASE, [self._key(digest)], [tag])

