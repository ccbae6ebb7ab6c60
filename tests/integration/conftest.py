"""
Fixtures for real-process tests: the fake Docker Hub as a subprocess,
regcache under twistd in front of it, and the images both serve.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.certs import CA
from tests.fakes.images import standard_images
from tests.fakes.serve import FakeHubProcess
from tests.integration.procs import Regcache
from tests.integration.redisproc import RedisServer
from tests.integration.seaweed import Seaweed

#: Big enough to take many reads and writes, small enough for a 10-minute suite.
LARGE = 110 * 1024 * 1024
USERS = {"ci": "s3cret-token"}


@pytest.fixture(scope="session")
def images_dir():
    d = Path(tempfile.mkdtemp(prefix="regcache-images-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def images(images_dir):
    """The catalog the fake Hub serves, with the files behind it."""
    return standard_images(images_dir, large_size=LARGE)


@pytest.fixture(scope="session")
def hub_process(images_dir, images):
    """The fake Hub's process: one for the session, since starting one costs a second or more."""
    with FakeHubProcess(images_dir, large_size=LARGE, users=USERS, private=["ci/private"]) as h:
        yield h


def fresh(hub: FakeHubProcess) -> FakeHubProcess:
    """
    ``hub`` as it started: every host up, no fault or mode, and counters,
    tags, rate limit and referrers as they began; started again should a
    test have ended it.
    """
    if hub.proc is None or hub.proc.poll() is not None:
        hub.start()
    hub.mode("normal")
    hub.reset()
    return hub


@pytest.fixture
def hub(hub_process):
    """The session's fake Hub, as it started (``fresh``), whatever the last test did to it."""
    return fresh(hub_process)


@pytest.fixture
def regcache(tmp_path, hub):
    """
    A factory: ``regcache(*args)`` starts twistd regcache in front of the
    fake Hub (with its account's credentials) and stops it after the test.
    """
    started = []
    password = tmp_path / "password"
    password.write_text(USERS["ci"] + "\n")

    def start(*args, upstream=None, storage=None, credentials=True, env=None, listen=None, open_files=None,
              port=None):
        extra = ["--username", "ci", "--password-file", str(password)] if credentials else []
        r = Regcache(storage or str(tmp_path / f"store{len(started)}"), upstream or hub.registry_url,
                     [*extra, *args], env=env, listen=listen, open_files=open_files, port=port)
        started.append(r)
        return r.start()

    yield start
    for r in started:
        r.stop()
        if os.environ.get("REGCACHE_TEST_LOGS"):
            print(r.log())


@pytest.fixture(scope="session")
def ghcr_dir():
    d = Path(tempfile.mkdtemp(prefix="regcache-ghcr-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ghcr(ghcr_dir):
    """A second registry, ghcr-like: its own images (``owner/app:v1``), token realm, and no accounts."""
    with FakeHubProcess(ghcr_dir, catalog="ghcr", no_rate_limit=True) as g:
        yield g


@pytest.fixture
def ca(tmp_path):
    """A certificate authority made for the test, to issue server certificates (tests.certs)."""
    return CA(str(tmp_path / "pki"))


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on loopback, killed after the test."""
    with RedisServer(str(tmp_path / "redis.log")) as server:
        yield server


@pytest.fixture
def seaweed(tmp_path):
    """A real SeaweedFS (weed mini) on loopback with an empty bucket, killed after the test."""
    with Seaweed(str(tmp_path / "seaweed")) as store:
        yield store
