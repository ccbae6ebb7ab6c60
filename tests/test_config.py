# test-case-name: tests.test_config
"""
Settings: command line over environment over defaults, and one clear error
for a bad value.
"""

import os
import subprocess
import sys

import pytest

from regcache.config import DOCKER_HUB, ConfigError, UpstreamURL, load, parse_duration, parse_size


def only(config):
    """The one upstream of a config without a file, and its one URL."""
    (upstream,) = config.upstreams
    (url,) = upstream.urls
    return upstream, url


def test_defaults():
    """With nothing given, regcache caches Docker Hub on port 5000 with a 60 s tag window."""
    c = load({}, {})
    upstream, url = only(c)
    assert c.listen == "tcp:5000" and url.url == DOCKER_HUB
    assert upstream.tag_ttl == 60 and upstream.max_stale is None and c.max_size is None
    assert url.username is None and url.password is None


def test_distribution_environment_names():
    """registry:2's REGISTRY_PROXY_* variables configure regcache too."""
    c = load({}, {
        "REGISTRY_PROXY_REMOTEURL": "https://mirror.gcr.io",
        "REGISTRY_PROXY_USERNAME": "bob",
        "REGISTRY_PROXY_PASSWORD": "s3cret",
    })
    assert only(c)[1] == UpstreamURL("https://mirror.gcr.io", "bob", "s3cret")


def test_precedence_cli_then_env_then_default():
    """The command line beats REGCACHE_*, which beats REGISTRY_PROXY_*, which beats the default."""
    env = {"REGCACHE_UPSTREAM": "https://a.example", "REGISTRY_PROXY_REMOTEURL": "https://b.example",
           "REGCACHE_TAG_TTL": "5m"}
    assert only(load({}, env))[1].url == "https://a.example"
    assert only(load({"upstream": "https://c.example"}, env))[1].url == "https://c.example"
    assert only(load({}, env))[0].tag_ttl == 300
    assert only(load({"tag-ttl": "10"}, env))[0].tag_ttl == 10


def test_password_file(tmp_path):
    """The password can come from a file (a mounted Secret), without its newline."""
    f = tmp_path / "pw"
    f.write_text("tok3n\n")
    c = load({"username": "u", "password-file": str(f)}, {})
    assert only(c)[1].password == "tok3n"
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


@pytest.mark.parametrize("given,expected", [
    ("http://registry.example/v2/", "http://registry.example"),
    ("http://registry.example/v2", "http://registry.example"),
    ("https://registry.example:5000/mirror/v2/", "https://registry.example:5000/mirror"),
    ("https://registry.example/mirror/", "https://registry.example/mirror"),
])
def test_upstream_api_suffix_is_dropped(given, expected):
    """An upstream given with its /v2 API path is its registry root: requests must not go to /v2/v2/."""
    assert only(load({"upstream": given}, {}))[1].url == expected


@pytest.mark.parametrize("text", ["0", "0s", "0m", " 0 "])
def test_max_stale_zero_means_no_stale_serving(text):
    """Every spelling of zero for --max-stale means never serve a tag stale, never "unlimited"."""
    assert only(load({"max-stale": text}, {}))[0].max_stale == 0


@pytest.mark.parametrize("text", ["unlimited", "none", "off", "UNLIMITED"])
def test_max_stale_words_mean_unlimited(text):
    """Only the words unlimited, none and off lift the --max-stale bound."""
    assert only(load({"max-stale": text}, {}))[0].max_stale is None


def test_max_stale_zero_serves_nothing_stale():
    """
    With --max-stale 0 an upstream failure is the client's error even for a
    tag checked this very instant: no cached digest stands in.
    """
    from tests.support import HubRig
    from tests.test_hub import ALL

    rig = HubRig(tag_ttl=0, max_stale=only(load({"max-stale": "0"}, {}))[0].max_stale)
    path = "/v2/library/small/manifests/1"
    assert rig.get(path, headers={"Accept": ALL}).status() == 200
    rig.hub.fault("status", scope="manifests", status=503)
    c = rig.client(path, headers={"Accept": ALL})
    rig.pass_time(3)
    assert c.status() == 503


@pytest.mark.parametrize("cli,fragment", [
    ({"max-size": "9" * 400}, "--max-size: too large"),
    ({"max-size": "9" * 400 + "Ti"}, "--max-size: too large"),
    ({"max-size": "0"}, "--max-size: must be more than zero"),
    ({"max-size": "0M"}, "--max-size: must be more than zero"),
    ({"max-size": ""}, "--max-size: not a size"),
    ({"max-stale": "9" * 400}, "--max-stale: too long"),
    ({"tag-ttl": "9" * 400 + "d"}, "--tag-ttl: too long"),
    ({"idle-timeout": "99999999999d"}, "--idle-timeout: too long"),
    ({"max-stale": ""}, "--max-stale: not a duration"),
])
def test_out_of_range_values_are_clear_errors(cli, fragment):
    """Huge, zero or empty sizes and durations are a ConfigError naming the setting, never an OverflowError."""
    with pytest.raises(ConfigError) as e:
        load(cli, {})
    assert str(e.value).startswith(fragment)


def test_units():
    """Durations and sizes take the suffixes operators type."""
    assert parse_duration("x", "1.5h") == 5400
    assert parse_size("x", "64Gi") == 64 * 2**30
    assert parse_size("x", "500M") == 500 * 10**6
    assert parse_size("x", "1000") == 1000
    assert parse_size("x", "2Pi") == 2 * 2**50


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


def test_revalidate_deadline():
    """--revalidate-deadline is 300 ms unless given, in milliseconds or seconds, and 0 is allowed."""
    assert only(load({}, {}))[0].revalidate_deadline == 0.3
    assert only(load({"revalidate-deadline": "1.5s"}, {}))[0].revalidate_deadline == 1.5
    assert only(load({}, {"REGCACHE_REVALIDATE_DEADLINE": "50ms"}))[0].revalidate_deadline == 0.05
    assert only(load({"revalidate-deadline": "0"}, {}))[0].revalidate_deadline == 0
    with pytest.raises(ConfigError, match="--revalidate-deadline: not a duration: 'soon'"):
        load({"revalidate-deadline": "soon"}, {})


def test_upstream_ca_and_insecure(tmp_path):
    """--upstream-ca holds the CA's PEM for the upstream; REGCACHE_UPSTREAM_INSECURE=yes turns checks off."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n")
    upstream, _ = only(load({"upstream-ca": str(ca)}, {}))
    assert upstream.ca == ca.read_bytes() and not upstream.insecure
    upstream, _ = only(load({}, {"REGCACHE_UPSTREAM_INSECURE": "yes"}))
    assert upstream.insecure and upstream.ca is None
    assert not only(load({}, {}))[0].insecure


@pytest.mark.parametrize("cli,env,fragment", [
    ({"upstream-ca": "/nonexistent/ca.pem"}, {}, "--upstream-ca: cannot read '/nonexistent/ca.pem'"),
    ({"upstream-ca": "EMPTY"}, {}, "holds no PEM certificate"),
    ({"upstream-ca": "EMPTY", "upstream-insecure": "yes"}, {}, "give only one"),
    ({}, {"REGCACHE_UPSTREAM_INSECURE": "maybe"}, "--upstream-insecure: not yes or no"),
])
def test_bad_upstream_tls_settings_name_the_setting(tmp_path, cli, env, fragment):
    """A CA file that cannot be read or holds no certificate, or a flag that is not yes/no, is one clear error."""
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    cli = {k: str(empty) if v == "EMPTY" else v for k, v in cli.items()}
    if "upstream-insecure" in cli:
        empty.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=fragment):
        load(cli, env)
