# test-case-name: tests.integration.test_upstream_tls_proc
"""
A real regcache in front of the fake Hub served over TLS with a CA made on
the fly: the upstream's certificate is verified, so without the CA nothing
is fetched; ``--upstream-ca`` (or a config file's ``ca``) trusts it; and
``--upstream-insecure`` fetches without verifying, with a warning at
start-up.
"""

import json

import pytest

from tests.fakes.serve import FakeHubProcess
from tests.integration.conftest import LARGE, USERS
from tests.integration.procs import Regcache

MANIFEST = "/v2/library/small/manifests/1"
ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


@pytest.fixture
def tls_hub(images_dir, images, ca):
    """The fake Hub with its registry, token and CDN ports on TLS, certified by ``ca`` for 127.0.0.1."""
    key, cert = ca.issue("hub")
    with FakeHubProcess(images_dir, large_size=LARGE, users=USERS, extra_args=["--tls", key, cert]) as h:
        assert h.registry_url.startswith("https://")
        yield h


@pytest.fixture
def start(tmp_path, tls_hub):
    started = []

    def start(*args, upstream=True):
        rc = Regcache(str(tmp_path / f"store{len(started)}"), tls_hub.registry_url if upstream else None, list(args))
        started.append(rc)
        return rc.start()

    yield start
    for rc in started:
        rc.stop()


def test_unknown_ca_is_refused(start, tls_hub, images):
    """Trusting only the system store, regcache will not fetch from an upstream certified by an unknown CA."""
    rc = start()
    status, _, body = rc.get(MANIFEST, headers=ACCEPT)
    assert status >= 500, body
    assert "errors" in json.loads(body)
    assert tls_hub.stats()["manifest_gets_total"] == 0, "a manifest was fetched over an unverified connection"


def test_upstream_ca_is_trusted(start, ca, images):
    """With --upstream-ca naming the private CA, the manifest comes through byte for byte."""
    rc = start("--upstream-ca", ca.path)
    status, _, body = rc.get(MANIFEST, headers=ACCEPT)
    assert status == 200, body
    assert body == images["library/small:1"].manifest


def test_config_file_ca_is_trusted(start, tmp_path, tls_hub, ca, images):
    """A config file's per-upstream ``ca`` trusts the private CA as --upstream-ca does."""
    config = tmp_path / "regcache.yaml"
    config.write_text(json.dumps({"upstreams": [{"name": "hub", "urls": [tls_hub.registry_url], "ca": ca.path,
                                                 "hosts": ["docker.io"], "docker_hub": True}]}))
    rc = start("--config", str(config), upstream=False)
    status, _, body = rc.get(MANIFEST, headers=ACCEPT)
    assert status == 200, body
    assert body == images["library/small:1"].manifest


def test_upstream_insecure_fetches_and_warns(start, images):
    """--upstream-insecure fetches without verifying, and says so at start-up."""
    rc = start("--upstream-insecure")
    status, _, body = rc.get(MANIFEST, headers=ACCEPT)
    assert status == 200, body
    assert body == images["library/small:1"].manifest
    assert "are not verified (insecure, as configured)" in rc.log()
