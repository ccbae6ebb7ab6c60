# test-case-name: tests.test_config
"""
Settings: command line over environment over defaults, and one clear error
for a bad value.
"""

import os
import subprocess
import sys

import pytest

from regcache.config import DOCKER_HUB, ConfigError, load, parse_duration, parse_size


def test_defaults():
    """With nothing given, regcache caches Docker Hub on port 5000 with a 60 s tag window."""
    c = load({}, {})
    assert c.listen == "tcp:5000" and c.upstream == DOCKER_HUB
    assert c.tag_ttl == 60 and c.max_stale is None and c.max_size is None
    assert c.username is None and c.password is None


def test_distribution_environment_names():
    """registry:2's REGISTRY_PROXY_* variables configure regcache too."""
    c = load({}, {
        "REGISTRY_PROXY_REMOTEURL": "https://mirror.gcr.io",
        "REGISTRY_PROXY_USERNAME": "bob",
        "REGISTRY_PROXY_PASSWORD": "s3cret",
    })
    assert (c.upstream, c.username, c.password) == ("https://mirror.gcr.io", "bob", "s3cret")


def test_precedence_cli_then_env_then_default():
    """The command line beats REGCACHE_*, which beats REGISTRY_PROXY_*, which beats the default."""
    env = {"REGCACHE_UPSTREAM": "https://a.example", "REGISTRY_PROXY_REMOTEURL": "https://b.example",
           "REGCACHE_TAG_TTL": "5m"}
    assert load({}, env).upstream == "https://a.example"
    assert load({"upstream": "https://c.example"}, env).upstream == "https://c.example"
    assert load({}, env).tag_ttl == 300
    assert load({"tag-ttl": "10"}, env).tag_ttl == 10


def test_password_file(tmp_path):
    """The password can come from a file (a mounted Secret), without its newline."""
    f = tmp_path / "pw"
    f.write_text("tok3n\n")
    c = load({"username": "u", "password-file": str(f)}, {})
    assert c.password == "tok3n"
    assert "tok3n" not in repr(c)


@pytest.mark.parametrize("cli,fragment", [
    ({"upstream": "ftp://x"}, "--upstream"),
    ({"upstream": "https://u:p@x"}, "--upstream"),
    ({"tag-ttl": "soon"}, "--tag-ttl"),
    ({"max-size": "lots"}, "--max-size"),
    ({"connect-timeout": "0"}, "--connect-timeout"),
    ({"password": "p"}, "--password needs --username"),
    ({"username": "u", "password-file": "/nonexistent/pw"}, "--password-file"),
])
def test_bad_values_name_the_setting(cli, fragment):
    """A bad value raises ConfigError whose message names the setting."""
    with pytest.raises(ConfigError) as e:
        load(cli, {})
    assert fragment in str(e.value)


def test_units():
    """Durations and sizes take the suffixes operators type."""
    assert parse_duration("x", "1.5h") == 5400
    assert parse_size("x", "64Gi") == 64 * 2**30
    assert parse_size("x", "500M") == 500 * 10**6
    assert parse_size("x", "1000") == 1000


def test_twistd_prints_one_line_for_a_bad_value(tmp_path):
    """A real `twistd regcache` with a bad value exits non-zero with one clear line."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    r = subprocess.run(
        [twistd, "-n", "--pidfile=", "regcache", "--storage", str(tmp_path), "--tag-ttl", "soon"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    lines = [l for l in (r.stderr + r.stdout).splitlines() if l.strip()]
    assert lines[-1] == "regcache: --tag-ttl: not a duration: 'soon' (use e.g. 60s, 5m, 1h)"


def _regcache(*args):
    """(exit status, stdout) of the ``regcache`` command (as ``python -m regcache``)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "regcache", *args], capture_output=True, text=True,
                       timeout=60, env=env)
    return r.returncode, r.stdout


def test_version_is_regcaches():
    """`regcache --version` prints regcache's version, not only Twisted's."""
    from regcache import __version__

    status, out = _regcache("--version")
    assert status == 0
    assert out.splitlines()[0].startswith(f"regcache {__version__}")


def test_help_mentions_verify():
    """`regcache --help` tells the operator that `regcache verify` exists and what it does."""
    status, out = _regcache("--help")
    assert status == 0
    assert "regcache verify" in out
