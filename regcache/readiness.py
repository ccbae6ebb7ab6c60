# test-case-name: tests.test_readiness
"""
What ``/readyz`` answers: whether this process should be sent clients.

It is ready as soon as the port is open, while the store can be written.
The start-up index is not waited for: on a store of a million blobs it takes
seconds, and the store serves meanwhile (a lookup it cannot answer from the
index goes to the disk; regcache.store).  Only eviction waits for it, so a
cache started at its limit may pass the limit by what it downloads during
those seconds.  ``regcache_store_indexed`` and the log line ``Indexed ...``
say when it is done.  Writability is probed in the store's thread pool every
``EVERY`` seconds and the answer cached, so the probe request itself never
touches the disk.

A full disk counts as writable: eviction frees room and the download under
way fails cleanly, so sending clients elsewhere would not help.  A read-only
or failing filesystem (EROFS, EIO, EACCES, ...) is not, and neither is one
whose probe has not come back within a period (a hung NFS mount): every
cold pull would fail there, while cached content is still served to the
clients that do come.
"""

import errno
import os
from typing import Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


#: The probe's file, in the store's root: outside tmp/, whose files the
#: store and its tests count as downloads.  One name, so that a probe cut
#: short by a crash leaves one five-byte file that the next probe reuses.
PROBE = ".ready-probe"


def probe(root: str) -> None:
    """
    Create, write, sync and remove a small file in ``root``; raise the
    OSError of the first step that fails, unless it is ENOSPC.
    """
    path = os.path.join(root, PROBE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return
        raise
    try:
        os.write(fd, b"ready")
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
        os.unlink(path)


class Readiness(Service):
    """
    The cached answer to "should clients come here?", kept up to date by a
    periodic probe while the service runs.
    """

    log = Logger()

    #: Seconds between write probes: well inside the chart's readiness
    #: period (20 s), so a failing disk is seen by the next probe or so.
    EVERY = 10.0

    def __init__(self, store, run: Callable[..., Deferred], clock):
        self.root = store.root
        self.run = run
        #: Why the store cannot be written, or None.  Store.prepare() wrote
        #: a probe of its own before the port opened, so it starts as None.
        self.unwritable: Optional[str] = None
        self._probing: Optional[Deferred] = None
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock

    def problem(self) -> Optional[str]:
        """None when ready; otherwise what stands in the way, in words."""
        if self.unwritable is not None:
            return f"the store cannot be written: {self.unwritable}"
        return None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.EVERY, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        # A LoopingCall stops for good on its first exception: log instead.
        try:
            if self._probing is not None:
                # The last probe has not returned in a whole period; do not
                # start another to hang beside it in the pool.
                self._set(f"a write has not returned for {self.EVERY:.0f}s")
                return
            self._probing = self.run(probe, self.root)
            self._probing.addCallbacks(lambda _: self._set(None), lambda f: self._set(f.getErrorMessage()))
            self._probing.addBoth(self._probed)
        except Exception:
            self.log.failure("Checking that the store can be written failed")

    def _probed(self, _) -> None:
        self._probing = None

    def _set(self, unwritable: Optional[str]) -> None:
        if unwritable is not None and self.unwritable is None:
            self.log.warn("The store is not writable, /readyz says not ready: {error}",
                          error=unwritable, root=self.root)
        elif unwritable is None and self.unwritable is not None:
            self.log.info("The store is writable again, /readyz says ready")
        self.unwritable = unwritable
