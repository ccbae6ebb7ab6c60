# test-case-name: tests.integration.test_secrets_proc
"""
The upstream password's hygiene in a real regcache: given on the command
line it is warned about (any local user can read it with ps); from
--password-file it is re-read on SIGHUP, and the tokens the old one earned
are dropped with it.  That no secret is ever shown is checked in
tests/integration/test_status_proc.py.
"""

import signal

from tests.integration.conftest import USERS
from tests.integration.procs import wait_for

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
PRIVATE = "/v2/ci/private/manifests/1"


def test_password_on_the_command_line_is_warned_about(regcache):
    """--password works but logs a warning naming ps; the warning does not hold the password."""
    rc = regcache("--username", "ci", "--password", USERS["ci"], credentials=False)
    assert rc.get(PRIVATE, headers=ACCEPT)[0] == 200
    log = rc.log()
    assert "--password is given on the command line, where any local user can read it (ps" in log
    assert USERS["ci"] not in log


def test_password_file_is_not_warned_about(regcache):
    """--password-file is the advised way: no warning."""
    rc = regcache()
    assert "--password is given on the command line" not in rc.log()


def test_sighup_rereads_the_password_file_and_drops_its_tokens(regcache, hub, tmp_path):
    """
    Every pull revalidates (tag TTL 0, nothing stale): a rotated password
    is used from the SIGHUP on, so a wrong one fails the next pull even
    though a token from the old one is still valid; the right one again
    makes it work.
    """
    password = tmp_path / "rotating"
    password.write_text(USERS["ci"])
    rc = regcache("--username", "ci", "--password-file", str(password), "--tag-ttl", "0", "--max-stale", "0",
                  credentials=False)
    assert rc.get(PRIVATE, headers=ACCEPT)[0] == 200
    assert rc.get(PRIVATE, headers=ACCEPT)[0] == 200  # with the cached token

    password.write_text("revoked-password")
    rc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: 'regcache_reloads_total{result="ok",what="credentials"} 1.0' in rc.get("/metrics")[2].decode())
    assert rc.get(PRIVATE, headers=ACCEPT)[0] != 200
    assert "New password for ci at " in rc.log()

    password.write_text(USERS["ci"] + "\n")
    rc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: 'regcache_reloads_total{result="ok",what="credentials"} 2.0' in rc.get("/metrics")[2].decode())
    assert rc.get(PRIVATE, headers=ACCEPT)[0] == 200
    assert "revoked-password" not in rc.log()
