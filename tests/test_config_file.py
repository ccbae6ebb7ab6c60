# test-case-name: tests.test_config_file
"""
The config file: what it declares, how it meets the command line, and one
line naming the file, the line and the key for every way it can be wrong.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from regcache.config import ConfigError, UpstreamURL, load
from regcache.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]

TWO = """\
upstreams:
  - name: dockerhub
    alias: dockerhub
    urls: [https://registry-1.docker.io]
  - name: ghcr
    alias: ghcr
    hosts: [ghcr.io]
    urls:
      - url: https://ghcr.io
        username: bob
        password_env: GHCR_TOKEN
    tag_ttl: 5m
    max_stale: 1h
cache:
  storage: /srv/cache
  max_size: 10Gi
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "regcache.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_two_upstreams(tmp_path):
    """A file declares upstreams with their hosts, aliases, URLs, credentials and windows, and the cache."""
    c = load({"config": write(tmp_path, TWO)}, {"GHCR_TOKEN": "t0k"})
    hub, ghcr = c.upstreams
    assert (hub.name, hub.alias, hub.docker_hub) == ("dockerhub", "dockerhub", True)
    assert set(hub.hosts) == {"docker.io", "registry-1.docker.io", "index.docker.io"}
    assert hub.realms == ("auth.docker.io",)
    assert (ghcr.hosts, ghcr.docker_hub, ghcr.tag_ttl, ghcr.max_stale) == (("ghcr.io",), False, 300, 3600)
    assert ghcr.urls == (UpstreamURL("https://ghcr.io", "bob", "t0k"),)
    assert "t0k" not in repr(c)
    assert (c.default, c.storage, c.max_size) == ("dockerhub", "/srv/cache", 10 * 2**30)


def test_default_is_docker_hub_else_the_first(tmp_path):
    """Names that name no registry go to the upstream answering for docker.io, else to the first one."""
    c = load({"config": write(tmp_path, """\
        upstreams:
          - {name: quay, urls: [https://quay.io]}
          - {name: hub, hosts: [docker.io], urls: [https://mirror.gcr.io]}
        """)}, {})
    assert c.default == "hub"
    assert c.upstreams[1].docker_hub is True
    c = load({"config": write(tmp_path, """\
        upstreams:
          - {name: quay, urls: [https://quay.io]}
          - {name: ghcr, urls: [https://ghcr.io]}
        default: ghcr
        """)}, {})
    assert c.default == "ghcr"
    c = load({"config": write(tmp_path, "upstreams: [{name: quay, urls: [https://quay.io]}]\n")}, {})
    assert (c.default, c.upstreams[0].hosts) == ("quay", ("quay.io",))


def test_command_line_and_environment_override_the_file(tmp_path):
    """A flag (or its variable) given with a file wins over the file's value, for every upstream."""
    env = {"GHCR_TOKEN": "x", "REGCACHE_MAX_SIZE": "1G"}
    c = load({"config": write(tmp_path, TWO), "tag-ttl": "7s", "storage": str(tmp_path / "s")}, env)
    assert [u.tag_ttl for u in c.upstreams] == [7, 7]
    assert [u.max_stale for u in c.upstreams] == [None, 3600]
    assert (c.storage, c.max_size) == (str(tmp_path / "s"), 10**9)


def test_config_from_the_environment(tmp_path):
    """REGCACHE_CONFIG names the file as --config does."""
    c = load({}, {"REGCACHE_CONFIG": write(tmp_path, TWO), "GHCR_TOKEN": "x"})
    assert [u.name for u in c.upstreams] == ["dockerhub", "ghcr"]


def test_single_upstream_options_are_refused_with_a_file(tmp_path):
    """--upstream and its credentials cannot be mixed with a file that declares the upstreams."""
    with pytest.raises(ConfigError, match="^--upstream: the upstreams are set in the config file"):
        load({"config": write(tmp_path, TWO), "upstream": "https://x.example"}, {"GHCR_TOKEN": "x"})


def test_without_a_file_one_upstream_answers_for_its_host_and_docker_hub():
    """The single-upstream form answers for its own host and for docker.io and its aliases, as registry:2 users run it."""
    c = load({"upstream": "https://Mirror.Example:5000"}, {})
    (u,) = c.upstreams
    assert u.name == "Mirror.Example:5000" and c.default == u.name
    assert u.hosts == ("mirror.example:5000", "docker.io", "registry-1.docker.io", "index.docker.io")
    # As before config files: library/ only for Docker Hub's own host names.
    assert u.docker_hub is False
    assert load({}, {}).upstreams[0].name == "docker.io"


def test_password_file(tmp_path):
    """A URL's password can come from a file (a mounted Secret), without its newline."""
    (tmp_path / "pw").write_text("s3cret\n")
    c = load({"config": write(tmp_path, f"""\
        upstreams:
          - name: q
            urls: [{{url: https://quay.io, username: u, password_file: {tmp_path / 'pw'}}}]
        """)}, {})
    assert c.upstreams[0].urls[0].password == "s3cret"


@pytest.mark.parametrize("text,line,fragment", [
    ("upstreams: [{name: a, urls: [https://a.io]}]\nstorage: /x\n", 2, "storage: '/x' is not of type 'object'"),
    ("upstreams:\n  - name: a\n    urls: [https://a.io]\n    url: https://b.io\n", 4, "upstreams[0].url: unknown key"),
    ("upstreams:\n  - name: a\n", 2, "upstreams[0]: 'urls' is required"),
    ("upstreams:\n  - name: a\n    urls: []\n", 3, "upstreams[0].urls: [] should be non-empty"),
    ("upstreams:\n  - name: a\n    urls: [https://a.io]\n    tag_ttl: [1]\n", 4,
     "upstreams[0].tag_ttl: [1] is not of type 'string', 'number'"),
    ("upstreams:\n  - name: a\n    urls: [https://a.io]\n    tag_ttl: soon\n", 4,
     "upstreams[0].tag_ttl: not a duration: 'soon'"),
    ("upstreams:\n  - name: a\n    urls: [https://a.io]\n    idle_timeout: 0\n", 4,
     "upstreams[0].idle_timeout: must be more than zero"),
    ("upstreams:\n  - name: a\n    urls:\n      - https://a.io\n      - ftp://b.io\n", 5,
     "upstreams[0].urls[1]: not an http(s) URL: 'ftp://b.io'"),
    ("upstreams:\n  - name: a\n    urls:\n      - url: https://u:p@a.io\n", 4,
     "upstreams[0].urls[0].url: no query, fragment or credentials in the URL"),
    ("upstreams:\n  - name: a\n    urls:\n      - url: https://a.io\n        username: u\n        password: p\n"
     "        password_env: P\n", 7, "upstreams[0].urls[0].password_env: give only one of password, password_env"),
    ("upstreams:\n  - name: a\n    urls:\n      - url: https://a.io\n        username: u\n        password_env: NOPE\n",
     6, "upstreams[0].urls[0].password_env: the environment variable NOPE is not set"),
    ("upstreams:\n  - name: a\n    urls:\n      - url: https://a.io\n        username: u\n"
     "        password_file: /nonexistent/pw\n", 6, "upstreams[0].urls[0].password_file: cannot read"),
    ("upstreams:\n  - name: a\n    urls:\n      - url: https://a.io\n        password: p\n", 5,
     "upstreams[0].urls[0].password: a password needs a username"),
    ("upstreams:\n  - name: a\n    urls:\n      - url: https://a.io\n        username: u\n", 5,
     "upstreams[0].urls[0].username: a username needs password"),
    ("upstreams:\n  - {name: a, urls: [https://a.io]}\n  - {name: a, urls: [https://b.io]}\n", 3,
     "upstreams[1].name: 'a' is already in upstreams[0]"),
    ("upstreams:\n  - {name: a, hosts: [x.io], urls: [https://a.io]}\n  - name: b\n    hosts: [X.io]\n"
     "    urls: [https://b.io]\n", 4, "upstreams[1].hosts: 'x.io' is already in upstreams[0]"),
    ("upstreams:\n  - {name: a, alias: g, urls: [https://a.io]}\n  - {name: b, alias: g, urls: [https://b.io]}\n", 3,
     "upstreams[1].alias: 'g' is already in upstreams[0]"),
    ("upstreams:\n  - name: a\n    hosts: ['ghcr.io/x']\n    urls: [https://a.io]\n", 3,
     "upstreams[0].hosts[0]: 'ghcr.io/x' does not match"),
    ("upstreams:\n  - name: a\n    alias: ghcr.io\n    urls: [https://a.io]\n", 3,
     "upstreams[0].alias: 'ghcr.io' does not match"),
    ("upstreams:\n  - name: ../a\n    urls: [https://a.io]\n", 2, "upstreams[0].name: '../a' does not match"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\ndefault: b\n", 2,
     "default: no upstream is named 'b' (upstreams: a)"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\ncache:\n  max_size: lots\n", 3,
     "cache.max_size: not a size: 'lots'"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\npolicy:\n  a:\n    rules: [{deny: x/*}]\n", 4,
     "policy.a: 'default' is required"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\nauth:\n  trusted_networks:\n    - 10.0.0.0/8\n"
     "    - 10.1.2.3/8\n", 5, "auth.trusted_networks[1]: not a network: '10.1.2.3/8'"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\nauth:\n  trusted_proxies: [nginx]\n", 3,
     "auth.trusted_proxies[0]: not a network: 'nginx'"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\nauth:\n  anonymous: maybe\n", 3,
     "auth.anonymous: 'maybe' is not one of"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\n\nauth:\n  passwd: /etc/x\n", 4, "auth.passwd: unknown key"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\nauth:\n  groups:\n    ci: [a:b]\n", 4,
     "auth.groups.ci[0]: 'a:b' does not match"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\nauth:\n  groups:\n    ci: [a]\n    anonymous: [alice]\n", 5,
     "auth.groups.anonymous: 'anonymous' is a built-in group (clients without credentials)"),
    ("upstreams: [{name: a, urls: [https://a.io]}]\nauth:\n  groups:\n    trusted: [bob]\n", 4,
     "auth.groups.trusted: 'trusted' is a built-in group (clients on a trusted network)"),
    ("cache: {storage: /x}\n", 1, "(top level): 'upstreams' is required"),
    ("- name: a\n", 1, "(top level): [{'name': 'a'}] is not of type 'object'"),
    ("", 1, "(top level): the file is empty"),
    ("upstreams:\n  - name: a\n   urls: [x]\n", 3, "not valid YAML"),
])
def test_every_bad_file_is_one_line_naming_file_line_and_key(tmp_path, text, line, fragment):
    """A bad file is a ConfigError of one line: the file, the line of the key at fault, the key path, the problem."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load({"config": path}, {"P": "x"})
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message, message


def test_unreadable_file_is_named():
    """A missing file is --config's error, naming the file."""
    with pytest.raises(ConfigError, match=r"^--config: cannot read '/nonexistent/r.yaml'"):
        load({"config": "/nonexistent/r.yaml"}, {})


def test_example_config_loads():
    """The commented example in docs/ is a valid config, with every upstream it shows."""
    c = load({"config": str(ROOT / "docs" / "regcache.example.yaml")},
             {"GHCR_TOKEN": "x", "QUAY_PASSWORD": "y"})
    assert {"docker.io", "ghcr.io", "quay.io"} <= {h for u in c.upstreams for h in u.hosts}
    assert c.default == next(u.name for u in c.upstreams if "docker.io" in u.hosts)


def test_twistd_prints_one_line_for_a_bad_file(tmp_path):
    """A real `twistd regcache --config` with a bad file exits non-zero, its last line naming file, line and key."""
    path = write(tmp_path, "upstreams:\n  - name: a\n    urls: [https://a.io]\n    tag_ttl: soon\n")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    r = subprocess.run([twistd, "-n", "--pidfile=", "regcache", "--storage", str(tmp_path), "--config", path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = [l for l in (r.stderr + r.stdout).splitlines() if l.strip()]
    assert lines[-1] == f"regcache: {path}:4: upstreams[0].tag_ttl: not a duration: 'soon' (use e.g. 60s, 5m, 1h)"


def test_several_urls_make_a_chain_of_their_own_clients(tmp_path):
    """
    An upstream with several URLs is served by a chain of one client per
    URL, in order, each with its own credentials and filed under the
    upstream's name.
    """
    from twisted.internet.testing import MemoryReactorClock

    from regcache.chain import Chain
    from regcache.service import _registry

    (tmp_path / "pw").write_text("tok\n")
    c = load({"config": write(tmp_path, f"""\
upstreams:
  - name: hub
    urls:
      - https://a.io
      - {{url: https://b.io, username: ci, password_file: {tmp_path / 'pw'}}}
"""), "storage": str(tmp_path / "s")}, {})
    registry = _registry(c.upstreams[0], MemoryReactorClock(), Metrics())
    assert isinstance(registry.upstream, Chain)
    a, b = registry.upstream.members
    assert (a.url, b.url) == ("https://a.io", "https://b.io")
    assert (a.credentials, b.credentials.username, b.credentials.password) == (None, "ci", "tok")
    assert (registry.upstream.key, a.key, b.key) == ("hub", "hub", "hub")


def test_revalidate_deadline_per_upstream(tmp_path):
    """Each upstream may set its own revalidate_deadline; the option, when given, wins for every upstream."""
    path = write(tmp_path, """\
        upstreams:
          - {name: hub, hosts: [docker.io], urls: [https://registry-1.docker.io], revalidate_deadline: 1s}
          - {name: quay, urls: [https://quay.io]}
        """)
    assert [u.revalidate_deadline for u in load({"config": path}, {}).upstreams] == [1.0, 0.3]
    given = load({"config": path, "revalidate-deadline": "100ms"}, {})
    assert [u.revalidate_deadline for u in given.upstreams] == [0.1, 0.1]


METRICS = """\
upstreams: [{name: hub, urls: [https://registry-1.docker.io]}]
metrics:
  listen: tcp:9102:interface=10.0.0.5
  ratelimit_probe: 10m
  repositories: [library/alpine, ghcr.io/owner/app]
"""


def test_metrics_section(tmp_path):
    """The file's metrics section sets the metrics port, the rate-limit probe and the repository allow-list."""
    c = load({"config": write(tmp_path, METRICS)}, {})
    assert (c.metrics_listen, c.ratelimit_probe) == ("tcp:9102:interface=10.0.0.5", 600)
    assert c.metrics_repositories == ("library/alpine", "ghcr.io/owner/app")


def test_metrics_options_override_the_file(tmp_path):
    """--ratelimit-probe and --metrics-listen (or their variables) win over the file; off turns the probe off."""
    c = load({"config": write(tmp_path, METRICS), "ratelimit-probe": "off"},
             {"REGCACHE_METRICS_LISTEN": "tcp:9300"})
    assert (c.metrics_listen, c.ratelimit_probe) == ("tcp:9300", None)


def test_metrics_defaults():
    """Without options or a file: no probe, /metrics on the registry port, no repository labels."""
    c = load({"storage": "/tmp/x"}, {})
    assert (c.metrics_listen, c.ratelimit_probe, c.metrics_repositories) == (None, None, ())
    assert load({"storage": "/tmp/x", "ratelimit-probe": "1h"}, {}).ratelimit_probe == 3600


@pytest.mark.parametrize("text, message", [
    ("metrics: {ratelimit_probe: 10s}", "metrics.ratelimit_probe: at least 1m, or off"),
    ("metrics: {ratelimit_probe: soon}", "metrics.ratelimit_probe: not a duration"),
    ("metrics: {repositories: [a, a]}", "metrics.repositories"),
    ("metrics: {port: 9102}", "metrics.port: unknown key"),
])
def test_metrics_section_mistakes(tmp_path, text, message):
    """A mistake in the metrics section names its key and line."""
    path = write(tmp_path, "upstreams: [{name: hub, urls: [https://registry-1.docker.io]}]\n" + text + "\n")
    with pytest.raises(ConfigError) as e:
        load({"config": path}, {})
    assert message in str(e.value)
    assert ":2:" in str(e.value)


def test_ratelimit_probe_option_mistakes():
    """A probe interval under a minute, or not a duration, stops start-up naming the option."""
    for text, message in (("30s", "--ratelimit-probe: at least 1m"), ("often", "--ratelimit-probe: not a duration")):
        with pytest.raises(ConfigError) as e:
            load({"storage": "/tmp/x", "ratelimit-probe": text}, {})
        assert message in str(e.value)


def test_per_upstream_ca_and_insecure(tmp_path):
    """``ca`` reads the CA's PEM for that upstream alone; ``insecure`` with it is refused naming the key."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n")
    text = f"upstreams:\n  - name: private\n    urls: [https://reg.internal]\n    ca: {ca}\n"
    (upstream,) = load({"config": write(tmp_path, text)}, {}).upstreams
    assert upstream.ca == ca.read_bytes() and not upstream.insecure
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.insecure: give ca or insecure, not both"):
        load({"config": write(tmp_path, text + "    insecure: true\n")}, {})
    with pytest.raises(ConfigError, match=r"--upstream-insecure: the upstreams are set in the config file"):
        load({"config": write(tmp_path, text), "upstream-insecure": "yes"}, {})


def test_a_new_password_needs_no_restart(tmp_path):
    """A rotated password is reloaded on SIGHUP, so it is not among the settings that take a restart; a new user is."""
    from regcache.config import restart_needed

    secret = tmp_path / "secret"
    secret.write_text("one")
    text = f"upstreams:\n  - name: a\n    urls:\n      - url: https://reg.internal\n        username: USER\n" \
           f"        password_file: {secret}\n"
    before = load({"config": write(tmp_path, text.replace("USER", "bob"))}, {})
    secret.write_text("two")
    assert restart_needed(before, load({"config": write(tmp_path, text.replace("USER", "bob"))}, {})) == []
    assert restart_needed(before, load({"config": write(tmp_path, text.replace("USER", "eve"))}, {})) == ["upstreams"]
