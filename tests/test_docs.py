"""
The configuration snippets in docs/ are what users paste into their
clients, so each one is parsed and checked against the keys its client
reads (see shared PROTOCOL.md §4-5).

A snippet is a fenced block whose info string is ``<language> <file>``,
e.g. ```` ```toml /etc/containerd/certs.d/docker.io/hosts.toml ````; the
file picks the checker.  Every JSON, TOML and YAML block must name a file
that has a checker, so a new snippet cannot slip in unchecked.  A
``regcache.yaml`` is loaded with regcache.config.load, and the client
snippets of clients.md that point at ``regcache.example:5000`` are routed
through regcache's Policy for that file, so each is known to reach the
upstream of the registry it is for (PROTOCOL.md §9).
"""

import json
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import helm_python as helm
import pytest
import yaml

from regcache import config as regcache_config
from regcache.errors import RegistryError
from regcache.policy import Policy, Registry
from twisted.internet.task import Clock

from tests.test_routing import Named

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
PARSERS = {"json": json.loads, "toml": tomllib.loads, "yaml": yaml.safe_load}


def snippets(docs=DOCS):
    """
    (doc, line, language, file, text) for every fenced block in these files.
    """
    found = []
    for doc in docs:
        source = doc.read_text()
        for match in FENCE.finditer(source):
            info = match.group(1).split()
            language = info[0] if info else ""
            target = info[1] if len(info) > 1 else ""
            line = source.count("\n", 0, match.start()) + 1
            found.append((doc.name, line, language, target, match.group(2)))
    return found


def snippet_id(snippet):
    return f"{snippet[0]}:{snippet[1]}:{snippet[3] or snippet[2]}"


CONFIG_SNIPPETS = [s for s in snippets() if s[2] in PARSERS]
SHELL_SNIPPETS = [s for s in snippets() if s[2] in ("sh", "bash", "shell")]


# --- What each client reads -----------------------------------------------


def http_url(text, path_allowed=False):
    """
    An http(s) URL with a host and no query, fragment or user info, as
    dockerd's ValidateMirror and containerd's host parser demand.
    """
    assert isinstance(text, str), f"{text!r}: not a URL"
    parts = urlsplit(text)
    assert parts.scheme in ("http", "https"), f"{text!r}: needs http:// or https://"
    assert parts.hostname, f"{text!r}: no host"
    assert not (parts.query or parts.fragment or parts.username), f"{text!r}: query/fragment/user"
    if not path_allowed:
        assert parts.path in ("", "/"), f"{text!r}: a mirror URL is the registry root"
    return parts


def host_only(text):
    """
    containers-registries.conf and GKE want host[:port][/path], no scheme.
    """
    assert "://" not in text, f"{text!r}: a location is not a URL, drop the scheme"
    assert re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?(/[^\s]*)?", text), f"{text!r}: not host[:port]"


def subset(keys, allowed, where):
    unknown = set(keys) - set(allowed)
    assert not unknown, f"{where}: keys the client does not read: {sorted(unknown)}"


def check_daemon_json(config):
    subset(config, {"registry-mirrors", "insecure-registries", "max-concurrent-downloads"},
           "daemon.json")
    mirrors = config["registry-mirrors"]
    assert isinstance(mirrors, list) and mirrors, "registry-mirrors is a non-empty list"
    for mirror in mirrors:
        http_url(mirror)


HOST_KEYS = {"capabilities", "skip_verify", "ca", "client", "header", "override_path",
             "dial_timeout"}
CAPABILITIES = {"pull", "resolve", "push", "referrers"}


def registry_dir(target):
    """
    The registry a hosts.toml is for: its certs.d directory's name, with
    containerd's ``host_port_`` spelling of host:port undone.
    """
    match = re.fullmatch(r"/etc/containerd/certs\.d/([^/]+)/hosts\.toml", target)
    assert match, target
    name = match.group(1)
    port = re.fullmatch(r"(.+)_(\d+)_", name)
    return f"{port.group(1)}:{port.group(2)}" if port else name


def check_hosts_toml(config, target):
    """
    ``server`` is the fallback: the directory's own registry (containerd's
    default when it is left out), and left out in ``_default``, which serves
    every registry: a server there would send all of them to one host.
    """
    registry = registry_dir(target)
    subset(config, {"server", "host"} | HOST_KEYS, "hosts.toml")
    if registry == "_default":
        assert "server" not in config, "_default: no server, so each registry falls back to itself"
        server = None
    else:
        server = http_url(config.get("server", f"https://{registry}"))
        own = regcache_config.DOCKER_HUB_HOSTS if registry == "docker.io" else (registry,)
        assert server.netloc in own, f"{target}: server {server.netloc} is not {registry}"
    hosts = config["host"]
    assert hosts, "at least one [host.\"...\"] mirror"
    for url, host in hosts.items():
        parts = http_url(url, path_allowed=True)
        assert server is None or parts.netloc != server.netloc, "the mirror is a host, not the server"
        subset(host, HOST_KEYS, f"[host.{url!r}]")
        caps = host.get("capabilities", sorted(CAPABILITIES))
        subset(caps, CAPABILITIES, f"[host.{url!r}].capabilities")
        assert "pull" in caps, "a mirror needs the pull capability"


def check_containerd_config(config):
    plugin = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.images"}[config["version"]]
    assert set(config["plugins"]) == {plugin}, \
        f"config version {config['version']} names the CRI registry plugin {plugin}"
    assert config["plugins"][plugin]["registry"] == {"config_path": "/etc/containerd/certs.d"}


def check_registries_yaml(config):
    subset(config, {"mirrors", "configs"}, "registries.yaml")
    for registry, mirror in config["mirrors"].items():
        subset(mirror, {"endpoint", "rewrite"}, f"mirrors.{registry}")
        assert isinstance(mirror["endpoint"], list) and mirror["endpoint"]
        for endpoint in mirror["endpoint"]:
            http_url(endpoint, path_allowed=True)
    for host, settings in config.get("configs", {}).items():
        host_only(host)
        subset(settings, {"auth", "tls"}, f"configs.{host}")
        subset(settings.get("tls", {}), {"ca_file", "cert_file", "key_file", "insecure_skip_verify"},
               f"configs.{host}.tls")


def check_registries_conf(config):
    subset(config, {"registry", "unqualified-search-registries", "short-name-mode"},
           "registries.conf")
    assert config["registry"], "at least one [[registry]]"
    for registry in config["registry"]:
        subset(registry, {"prefix", "location", "insecure", "blocked", "mirror",
                          "mirror-by-digest-only"}, "[[registry]]")
        host_only(registry["prefix"])
        host_only(registry["location"])
        assert registry["mirror"], "at least one [[registry.mirror]]"
        for mirror in registry["mirror"]:
            subset(mirror, {"location", "insecure", "pull-from-mirror"}, "[[registry.mirror]]")
            host_only(mirror["location"])
            assert mirror.get("pull-from-mirror", "all") in ("all", "digest-only", "tag-only")
            assert isinstance(mirror.get("insecure", False), bool)


def mirror_flags(args):
    """
    The URL after each --registry-mirror in dockerd arguments, in order
    (None for a flag with no value), or [None] when there is none.
    """
    urls = []
    for i, arg in enumerate(args):
        if arg == "--registry-mirror":
            urls.append(args[i + 1] if i + 1 < len(args) else None)
        elif arg.startswith("--registry-mirror="):
            urls.append(arg.split("=", 1)[1])
    return urls or [None]


def check_mirror_flags(args):
    urls = mirror_flags(args)
    for url in urls:
        http_url(url)
    return urls


def check_gitlab_ci(config):
    """
    Some job starts a dind service that gets --registry-mirror, either as
    its command or through $DOCKER_OPTS expanded by its entrypoint.
    """
    configured = 0
    for name, job in config.items():
        for service in job.get("services", []) if isinstance(job, dict) else []:
            if isinstance(service, str) or "dind" not in service["name"]:
                continue
            command = service.get("command")
            entrypoint = service.get("entrypoint")
            if command is not None:
                assert all(isinstance(a, str) for a in command), "command is a list of strings"
                check_mirror_flags(command)
                configured += 1
            elif entrypoint is not None:
                assert "dockerd-entrypoint.sh" in " ".join(entrypoint)
                assert "$DOCKER_OPTS" in " ".join(entrypoint)
                configured += 1
    assert configured, "no dind service is given the mirror"


def check_runner_config(config):
    """
    Each runner gives dind the mirror one way: a [[runners.docker.services]]
    command, a daemon.json mounted read-only, or DOCKER_OPTS in environment.
    """
    for runner in config["runners"]:
        subset(runner, {"name", "url", "token", "executor", "environment", "docker", "kubernetes"},
               "[[runners]]")
        ways = 0
        for variable in runner.get("environment", []):
            name, _, value = variable.partition("=")
            if name == "DOCKER_OPTS":
                check_mirror_flags(value.split())
                ways += 1
        docker = runner.get("docker", {})
        for service in docker.get("services", []):
            if "dind" in service["name"]:
                check_mirror_flags(service["command"])
                ways += 1
        for volume in docker.get("volumes", []):
            parts = volume.split(":")
            if len(parts) >= 2 and parts[1] == "/etc/docker/daemon.json":
                assert parts[2:] == ["ro"], "mount daemon.json read-only"
                ways += 1
        assert ways == 1, f"runner {runner.get('name')}: {ways} ways to set the mirror"


GKE_HOST_KEYS = {"host", "overridePath", "capabilities", "header", "dialTimeout", "ca", "client"}
GKE_CAPABILITIES = {"HOST_CAPABILITY_PULL", "HOST_CAPABILITY_RESOLVE", "HOST_CAPABILITY_PUSH"}


def check_gke_containerd(config):
    """
    The fields gcloud's --containerd-config-from-file accepts.
    """
    subset(config, {"privateRegistryAccessConfig", "writableCgroups", "registryHosts"},
           "containerd config file")
    for entry in config["registryHosts"]:
        subset(entry, {"server", "hosts"}, "registryHosts[]")
        host_only(entry["server"])
        for host in entry["hosts"]:
            subset(host, GKE_HOST_KEYS, "registryHosts[].hosts[]")
            host_only(host["host"])
            assert host["host"] != entry["server"]
            subset(host.get("capabilities", []), GKE_CAPABILITIES, "capabilities")
            assert "HOST_CAPABILITY_PULL" in host["capabilities"]
            if "dialTimeout" in host:
                assert re.fullmatch(r"\d+(\.\d+)?s", host["dialTimeout"])


def secrets_named(data):
    """
    A value for each environment variable the config's URLs read a
    password from, as an operator would have set them.
    """
    return {url["password_env"]: "doc-secret" for u in data.get("upstreams", ())
            for url in u.get("urls", ()) if isinstance(url, dict) and "password_env" in url}


def check_regcache_config(data):
    """
    A regcache config file loads as `regcache --config` loads it: schema,
    durations, credentials, unique hosts and aliases, the default.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "regcache.yaml"
        path.write_text(yaml.safe_dump(data))
        return regcache_config.load({"config": str(path)}, secrets_named(data))


def check_auth_json(config):
    """
    containers-auth.json(5): ``auths`` keyed by host[:port][/path], each
    with ``auth``, the base64 of user:password.
    """
    import base64

    subset(config, {"auths", "credHelpers"}, "auth.json")
    assert config["auths"], "at least one entry"
    for host, entry in config["auths"].items():
        host_only(host)
        subset(entry, {"auth", "identitytoken"}, f"auths.{host}")
        user, colon, _ = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        assert user and colon, f"auths.{host}.auth: not base64 of user:password"


def check_chart_values(values):
    helm.Chart.load(ROOT / "chart" / "regcache").validate_schema(values)


#: What regcache keeps in the bucket that a lifecycle rule may expire:
#: never its leases, which it manages itself.
LIFECYCLE_PREFIXES = {"blobs/", "uses/"}


def check_gcs_lifecycle(config):
    """A GCS lifecycle config (gcloud's --lifecycle-file): Delete rules only on regcache's expirable prefixes."""
    subset(config, {"rule"}, "lifecycle")
    for rule in config["rule"]:
        subset(rule, {"action", "condition"}, "rule")
        assert rule["action"]["type"] in ("Delete", "AbortIncompleteMultipartUpload"), rule
        subset(rule["condition"], {"age", "matchesPrefix"}, "condition")
        assert isinstance(rule["condition"]["age"], int) and rule["condition"]["age"] > 0, rule
        assert set(rule["condition"].get("matchesPrefix", [])) <= LIFECYCLE_PREFIXES, rule
        assert rule["action"]["type"] != "Delete" or rule["condition"].get("matchesPrefix"), \
            f"{rule}: a Delete rule without a prefix would expire the leases too"


def check_s3_lifecycle(config):
    """An S3 lifecycle configuration (put-bucket-lifecycle-configuration), on regcache's expirable prefixes."""
    subset(config, {"Rules"}, "lifecycle")
    for rule in config["Rules"]:
        subset(rule, {"ID", "Status", "Filter", "Expiration", "AbortIncompleteMultipartUpload"}, "rule")
        assert rule["Status"] in ("Enabled", "Disabled"), rule
        prefix = rule["Filter"].get("Prefix")
        if "Expiration" in rule:
            assert prefix in LIFECYCLE_PREFIXES, f"{rule}: expires outside {sorted(LIFECYCLE_PREFIXES)}"
            assert rule["Expiration"]["Days"] > 0, rule
        else:
            assert rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] > 0, rule


CHECKERS = [
    (r"/etc/docker/daemon\.json", check_daemon_json),
    (r"/etc/containerd/certs\.d/.+/hosts\.toml", check_hosts_toml),
    (r"/etc/containerd/config\.toml", check_containerd_config),
    (r"/etc/rancher/(k3s|rke2)/registries\.yaml", check_registries_yaml),
    (r"/etc/containers/registries\.conf(\.d/.+\.conf)?", check_registries_conf),
    (r"\.gitlab-ci\.yml", check_gitlab_ci),
    (r"/etc/gitlab-runner/config\.toml", check_runner_config),
    (r"containerd-mirror\.yaml", check_gke_containerd),
    (r"(\$\{XDG_RUNTIME_DIR\}/containers|/etc/containers)/auth\.json", check_auth_json),
    (r"values\.yaml|[\w-]+-values\.yaml", check_chart_values),
    (r"regcache\.yaml", check_regcache_config),
    (r"gcs-lifecycle\.json", check_gcs_lifecycle),
    (r"s3-lifecycle\.json", check_s3_lifecycle),
]


def checker_for(target):
    for pattern, check in CHECKERS:
        if re.fullmatch(pattern, target):
            return check
    return None


def run_checker(check, config, target):
    if check is check_hosts_toml:
        return check(config, target)
    return check(config)


# --- Tests ----------------------------------------------------------------


@pytest.mark.parametrize("snippet", CONFIG_SNIPPETS, ids=snippet_id)
def test_config_snippet_parses_and_has_the_keys_its_client_reads(snippet):
    """
    The snippet parses as its language, names the file it belongs in, and
    that file's checker accepts its keys and values.
    """
    doc, line, language, target, text = snippet
    config = PARSERS[language](text)
    check = checker_for(target)
    assert check is not None, f"{doc}:{line}: name the file after ```{language} (one with a checker)"
    run_checker(check, config, target)


def test_every_client_is_documented():
    """
    docs/ has a checked snippet for each client issue 5 lists: dockerd,
    containerd, k3s, podman/CRI-O, GitLab dind (service command, runner
    config and DOCKER_OPTS) and GKE, plus chart values and regcache
    config files.
    """
    covered = {checker_for(s[3]) for s in CONFIG_SNIPPETS}
    assert {check for _, check in CHECKERS} <= covered
    gitlab = [s[4] for s in CONFIG_SNIPPETS if checker_for(s[3]) is check_runner_config]
    assert any("DOCKER_OPTS" in text for text in gitlab)
    assert any("runners.docker.services" in text for text in gitlab)


@pytest.mark.parametrize("snippet", SHELL_SNIPPETS, ids=snippet_id)
def test_shell_snippets_are_valid_bash(snippet):
    """
    Shell snippets at least parse (bash -n), so a stray quote or
    backslash does not reach a user's terminal.
    """
    result = subprocess.run(["bash", "-n"], input=snippet[4], text=True, capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("check, config, target", [
    (check_daemon_json, {"registry-mirror": ["https://m.example"]}, ""),
    (check_daemon_json, {"registry-mirrors": ["m.example"]}, ""),
    (check_daemon_json, {"registry-mirrors": ["https://m.example/?x=1"]}, ""),
    (check_daemon_json, {"registry-mirrors": ["https://user:pw@m.example"]}, ""),
    (check_hosts_toml, {"server": "https://registry-1.docker.io",
                        "host": {"https://m.example": {"capabilities": ["pull", "fetch"]}}},
     "/etc/containerd/certs.d/docker.io/hosts.toml"),
    (check_hosts_toml, {"server": "https://registry-1.docker.io",
                        "host": {"https://m.example": {"capabilities": ["resolve"]}}},
     "/etc/containerd/certs.d/docker.io/hosts.toml"),
    (check_hosts_toml, {"server": "https://registry-1.docker.io",
                        "host": {"https://m.example": {}}},
     "/etc/containerd/hosts.toml"),
    (check_hosts_toml, {"server": "https://registry-1.docker.io",
                        "host": {"http://regcache.example:5000": {"capabilities": ["pull", "resolve"]}}},
     "/etc/containerd/certs.d/_default/hosts.toml"),
    (check_hosts_toml, {"server": "https://registry-1.docker.io",
                        "host": {"http://regcache.example:5000": {"capabilities": ["pull", "resolve"]}}},
     "/etc/containerd/certs.d/ghcr.io/hosts.toml"),
    (check_containerd_config, {"version": 3, "plugins": {"io.containerd.grpc.v1.cri": {
        "registry": {"config_path": "/etc/containerd/certs.d"}}}}, ""),
    (check_registries_yaml, {"mirrors": {"docker.io": {"endpoint": "https://m.example"}}}, ""),
    (check_registries_yaml, {"mirror": {"docker.io": {"endpoint": ["https://m.example"]}}}, ""),
    (check_registries_conf, {"registry": [{"prefix": "docker.io", "location": "docker.io",
                                           "mirror": [{"location": "https://m.example"}]}]}, ""),
    (check_registries_conf, {"registry": [{"prefix": "docker.io", "location": "docker.io",
                                           "mirrors": [{"location": "m.example"}]}]}, ""),
    (check_gitlab_ci, {"build": {"services": ["docker:dind"]}}, ""),
    (check_gitlab_ci, {"build": {"services": [{"name": "docker:dind",
                                               "command": ["--registry-mirror"]}]}}, ""),
    (check_gitlab_ci, {"build": {"services": [{"name": "docker:dind", "command": [
        "--registry-mirror=https://mirror.gcr.io", "--registry-mirror=regcache.example:5000"]}]}}, ""),
    (check_runner_config, {"runners": [{"name": "r", "environment": [
        "DOCKER_OPTS=--registry-mirror=https://mirror.gcr.io --registry-mirror"]}]}, ""),
    (check_regcache_config, {"upstreams": [{"name": "hub", "url": "https://registry-1.docker.io"}]}, ""),
    (check_regcache_config, {"upstreams": [{"name": "a", "hosts": ["ghcr.io"], "urls": ["https://ghcr.io"]},
                                           {"name": "b", "hosts": ["ghcr.io"], "urls": ["https://b.io"]}]}, ""),
    (check_regcache_config, {"upstreams": [{"name": "hub", "urls": ["https://registry-1.docker.io"]}],
                             "default": "ghcr"}, ""),
    (check_runner_config, {"runners": [{"name": "r", "docker": {
        "volumes": ["/srv/daemon.json:/etc/docker/daemon.json"]}}]}, ""),
    (check_runner_config, {"runners": [{"name": "r", "environment": ["DOCKER_OPTS=--debug"]}]}, ""),
    (check_auth_json, {"auths": {"https://m.example": {"auth": "cm9ib3Q6c2VjcmV0"}}}, ""),
    (check_auth_json, {"auths": {"m.example": {"auth": "bm9jb2xvbg=="}}}, ""),
    (check_gke_containerd, {"registryHosts": [{"server": "https://docker.io", "hosts": [
        {"host": "m.example", "capabilities": ["HOST_CAPABILITY_PULL"]}]}]}, ""),
    (check_gke_containerd, {"registryHosts": [{"server": "docker.io", "hosts": [
        {"host": "m.example", "capabilities": ["pull"]}]}]}, ""),
])
def test_checkers_reject_what_clients_would_not_read(check, config, target):
    """
    Each checker really checks: a wrong key, a URL where a host is wanted
    (or the reverse), a bad capability or a missing mirror fails it.
    """
    with pytest.raises((AssertionError, KeyError, TypeError, regcache_config.ConfigError)):
        run_checker(check, config, target)


# --- Several registries behind one regcache (docs/clients.md) -------------

#: The mirror address of the several-registry snippets in clients.md.
REGCACHE = "regcache.example:5000"
CLIENTS = [s for s in CONFIG_SNIPPETS if s[0] == "clients.md"]
REGCACHE_CONFIGS = [s for s in CLIENTS if s[3] == "regcache.yaml"]
WANTED_HOSTS_TOML = {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "_default"}


def documented_policy():
    """
    The routing regcache would run with the config of "Which registries
    does regcache serve?" (the first regcache.yaml in clients.md).
    """
    config = check_regcache_config(yaml.safe_load(REGCACHE_CONFIGS[0][4]))
    registries = [Registry(u.name, frozenset(u.hosts), Named(u.docker_hub), u.tag_ttl, u.max_stale, u.alias)
                  for u in config.upstreams]
    return Policy(registries, Clock(), config.default)


def sample_name(registry):
    """A repository as the client sends it for that registry."""
    return "library/alpine" if registry in regcache_config.DOCKER_HUB_HOSTS else "owner/app"


def routed(route, registry, name):
    """The route reaches the upstream answering for ``registry``, asking it for ``name``."""
    assert registry in route.registry.hosts, f"{registry} reaches {route.registry.name} ({route.registry.hosts})"
    assert route.name == name, f"{registry}: upstream asked for {route.name!r}, not {name!r}"


def go_rewrite(rewrites, name):
    """
    k3s's rewrite of a repository name: the first Go regexp that matches,
    with its $1 / ${1} references.
    """
    for pattern, replacement in rewrites.items():
        if re.search(pattern, name):
            return re.sub(pattern, re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", replacement), name, count=1)
    return name


def mirrored(text):
    """Whether a snippet points a client at the several-registry regcache."""
    return REGCACHE in text


def test_the_several_registry_sections_are_shown():
    """
    clients.md has the regcache config the client sections are checked
    against, hosts.toml for docker.io, ghcr.io, quay.io, registry.k8s.io and
    _default, k3s with several mirrors and a rewrite, and podman/CRI-O with
    a path-prefix mirror, all pointing at regcache.
    """
    assert len(REGCACHE_CONFIGS) >= 2, "the registries config and the GitLab chain"
    hosts_toml = {registry_dir(s[3]) for s in CLIENTS if checker_for(s[3]) is check_hosts_toml and mirrored(s[4])}
    assert WANTED_HOSTS_TOML <= hosts_toml
    k3s = [yaml.safe_load(s[4]) for s in CLIENTS if checker_for(s[3]) is check_registries_yaml and mirrored(s[4])]
    assert any(len(c["mirrors"]) >= 3 and any("rewrite" in m for m in c["mirrors"].values()) for c in k3s)
    conf = [tomllib.loads(s[4]) for s in CLIENTS if checker_for(s[3]) is check_registries_conf and mirrored(s[4])]
    assert any("/" in m["location"] for c in conf for r in c["registry"] for m in r["mirror"])


@pytest.mark.parametrize("snippet", [s for s in CLIENTS if checker_for(s[3]) is check_hosts_toml and mirrored(s[4])],
                         ids=snippet_id)
def test_containerd_hosts_reach_their_registry(snippet):
    """
    containerd sends ?ns=<the directory's registry>: each hosts.toml for a
    registry reaches the upstream answering for it, and through _default a
    registry regcache has no upstream for (gcr.io) is a 404 NAME_UNKNOWN,
    so containerd falls back to that registry itself.
    """
    registry = registry_dir(snippet[3])
    policy = documented_policy()
    if registry == "_default":
        with pytest.raises(RegistryError) as e:
            policy.route("project/app", "gcr.io")
        assert (e.value.status, e.value.code) == (404, "NAME_UNKNOWN")
    else:
        routed(policy.route(sample_name(registry), registry), registry, sample_name(registry))


@pytest.mark.parametrize("snippet", [s for s in CLIENTS if checker_for(s[3]) is check_registries_yaml
                                     and mirrored(s[4])], ids=snippet_id)
def test_k3s_mirrors_reach_their_registry(snippet):
    """
    k3s's containerd sends ?ns=<registry> and the name after its rewrite;
    each mirror, rewritten or not, reaches the upstream answering for the
    registry and asks it for the name the user pulled.
    """
    policy = documented_policy()
    for registry, mirror in yaml.safe_load(snippet[4])["mirrors"].items():
        for endpoint in mirror["endpoint"]:
            path = urlsplit(endpoint).path.strip("/").removeprefix("v2").strip("/")
            name = sample_name(registry)
            sent = "/".join(p for p in (path, go_rewrite(mirror.get("rewrite", {}), name)) if p)
            routed(policy.route(sent, registry), registry, name)


@pytest.mark.parametrize("snippet", [s for s in CLIENTS if checker_for(s[3]) is check_registries_conf
                                     and mirrored(s[4])], ids=snippet_id)
def test_podman_mirrors_reach_their_registry(snippet):
    """
    podman and CRI-O send no ns and put the location's path before the
    name: each mirror reaches the upstream answering for its prefix's
    registry, Docker Hub's with no path through the default upstream.
    """
    policy = documented_policy()
    for registry in tomllib.loads(snippet[4])["registry"]:
        host = registry["prefix"].split("/")[0]
        for mirror in registry["mirror"]:
            path = mirror["location"].partition("/")[2]
            name = sample_name(host)
            routed(policy.route(f"{path}/{name}" if path else name), host, name)


def test_dockerd_reaches_docker_hub():
    """
    dockerd sends no ns and no prefix: the documented config's default
    upstream is Docker Hub's, so its mirror requests get Docker Hub images.
    """
    routed(documented_policy().route("library/alpine"), "docker.io", "library/alpine")


def test_gitlab_shows_the_seeds_two_mirrors_and_the_chain_that_replaces_them():
    """
    The GitLab section gives dind mirror.gcr.io then regcache, as a service
    command and in DOCKER_OPTS, and a regcache config whose Docker Hub
    upstream tries mirror.gcr.io, then Docker Hub.
    """
    two = ["https://mirror.gcr.io", f"http://{REGCACHE}"]
    commands = [service["command"] for s in CLIENTS if checker_for(s[3]) is check_gitlab_ci
                for job in yaml.safe_load(s[4]).values() for service in job.get("services", [])
                if isinstance(service, dict) and "command" in service]
    assert two in [mirror_flags(c) for c in commands]
    opts = [v.partition("=")[2] for s in CLIENTS if checker_for(s[3]) is check_runner_config
            for r in tomllib.loads(s[4])["runners"] for v in r.get("environment", []) if v.startswith("DOCKER_OPTS=")]
    assert two in [mirror_flags(o.split()) for o in opts]
    chains = [[url.url for url in u.urls] for s in REGCACHE_CONFIGS
              for u in check_regcache_config(yaml.safe_load(s[4])).upstreams if "docker.io" in u.hosts]
    assert ["https://mirror.gcr.io", "https://registry-1.docker.io"] in chains


def helm_commands():
    """
    (snippet id, --set expressions) for each `helm install|upgrade` of the
    local chart in the shell snippets of docs/ and the README.
    """
    found = []
    shell = SHELL_SNIPPETS + [s for s in snippets([ROOT / "README.md"]) if s[2] in ("sh", "bash")]
    for snippet in shell:
        for line in snippet[4].replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if words[:2] in (["helm", "install"], ["helm", "upgrade"]) and "./chart/regcache" in words:
                sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
                found.append((snippet_id(snippet), sets))
    return found


@pytest.mark.parametrize("where, sets", helm_commands(), ids=[c[0] for c in helm_commands()])
def test_documented_helm_commands_render_valid_objects(where, sets):
    """
    The --set values of each documented `helm install` pass the chart's
    schema, render, and every object validates for Kubernetes (a --set
    that replaced a list half-way, say, would fail here).
    """
    import kubernetes_validate

    values = helm.parse_set_string(",".join(sets))
    chart = helm.Chart.load(ROOT / "chart" / "regcache")
    rendered = chart.render(values=values, name="regcache", namespace="regcache")
    objects = [o for path, text in rendered.items() if path.endswith(".yaml")
               for o in yaml.safe_load_all(text) if o]
    assert any(o["kind"] == "Deployment" for o in objects)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)


def test_the_install_command_is_documented():
    """
    docs/kubernetes.md shows `helm install regcache ./chart/regcache --set ...`,
    the command the README's deploy section uses.
    """
    assert any(where.startswith("kubernetes.md") and sets for where, sets in helm_commands())
