# test-case-name: tests.test_config
"""
The settings regcache runs with, merged once from the command line, the
environment, the config file and the defaults, in that order of precedence.

Environment names include distribution's (``REGISTRY_PROXY_*``), so regcache
drops in where ``registry:2`` ran in proxy mode.  Everything is coerced and
checked here, so the rest of the code only ever sees valid, typed values and a
bad value stops start-up with one line that names it (for the config file:
the file, the key and its line).

Without a config file the single-upstream options are a one-upstream config
that answers for its own host and for Docker Hub's names: as registry:2 is run,
such a mirror is a Docker Hub mirror even when its URL is another cache in
front of Docker Hub.
"""

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from urllib.parse import urlsplit

from regcache.rules import ANONYMOUS, TRUSTED, PatternError, Rule, RuleSet, name_regex, tag_regex
from regcache.s3 import BucketSettings

DOCKER_HUB = "https://registry-1.docker.io"

#: Docker Hub's registry host names: ``docker.io`` in image references,
#: the others in URLs and old configs.
DOCKER_HUB_HOSTS = ("docker.io", "registry-1.docker.io", "index.docker.io")

#: Where Docker Hub's registry sends clients for tokens.
DOCKER_HUB_REALMS = ("auth.docker.io",)

_SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.schema.json")

class ConfigError(ValueError):
    """
    A setting has a value regcache cannot run with.  The message names the
    setting and is meant to be shown to the operator as it is.
    """


@dataclass(frozen=True)
class Setting:
    """
    One setting: its option name, the environment names it also reads (first
    wins) and its default, as the string a user would have typed.
    """

    name: str
    env: Tuple[str, ...]
    default: Optional[str]
    help: str


def _default_storage() -> str:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/regcache"
    return os.path.join(os.path.expanduser("~"), ".cache", "regcache")


SETTINGS = (
    Setting("config", ("REGCACHE_CONFIG",), None,
            "YAML file of upstreams, routing and cache settings (see docs/regcache.example.yaml)"),
    Setting("listen", ("REGCACHE_LISTEN",), "tcp:5000",
            "Twisted endpoint to serve on, e.g. tcp:5000, ssl:5443:privateKey=k.pem, unix:/run/regcache.sock"),
    Setting("storage", ("REGCACHE_STORAGE", "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"), None,
            "Cache directory (default /var/lib/regcache as root, else ~/.cache/regcache)"),
    Setting("upstream", ("REGCACHE_UPSTREAM", "REGISTRY_PROXY_REMOTEURL"), DOCKER_HUB,
            "Upstream registry URL"),
    Setting("username", ("REGCACHE_USERNAME", "REGISTRY_PROXY_USERNAME"), None,
            "Upstream user name"),
    Setting("password", ("REGCACHE_PASSWORD", "REGISTRY_PROXY_PASSWORD"), None,
            "Upstream password or access token (prefer --password-file)"),
    Setting("password-file", ("REGCACHE_PASSWORD_FILE",), None,
            "File holding the upstream password or access token"),
    Setting("tag-ttl", ("REGCACHE_TAG_TTL",), "60s",
            "How long a tag is served from cache before it is revalidated upstream with a HEAD"),
    Setting("max-stale", ("REGCACHE_MAX_STALE",), "unlimited",
            "Oldest tag (time since its last successful check) served while upstream fails; "
            "0 never serves a tag stale, unlimited (or none, off) always does"),
    Setting("max-size", ("REGCACHE_MAX_SIZE",), "unlimited",
            "Cache size limit in bytes, or with a suffix: 500M, 64Gi; unlimited (or none, off) for none"),
    Setting("connect-timeout", ("REGCACHE_CONNECT_TIMEOUT",), "5s",
            "Upstream TCP/TLS connect timeout"),
    Setting("header-timeout", ("REGCACHE_HEADER_TIMEOUT",), "5s",
            "Upstream wait for response headers"),
    Setting("idle-timeout", ("REGCACHE_IDLE_TIMEOUT",), "15s",
            "Upstream body stall that ends a download (it then resumes with Range)"),
    Setting("min-download-rate", ("REGCACHE_MIN_DOWNLOAD_RATE",), "10k",
            "Slowest average a blob download may keep over a minute, in bytes a second (10k, 1M), before it "
            "resumes and, slow again, fails; off for no floor"),
    Setting("upstream-allow", ("REGCACHE_UPSTREAM_ALLOW",), None,
            "Networks (CIDR, comma-separated) an upstream's redirects and token realms may lead to beyond the "
            "default rule: never to an address more private than the upstream's own"),
    Setting("upstream-ca", ("REGCACHE_UPSTREAM_CA",), None,
            "PEM file of the CA certificates the upstream's TLS certificate is checked against, instead of the "
            "system's trust store (a private registry's CA)"),
    Setting("upstream-insecure", ("REGCACHE_UPSTREAM_INSECURE",), None,
            "Do not verify the upstream's TLS certificate at all (a flag; warned about at start-up)"),
    Setting("client-header-timeout", ("REGCACHE_CLIENT_HEADER_TIMEOUT",), "10s",
            "Longest a client may take to send a request's headers, from their first byte"),
    Setting("client-progress-timeout", ("REGCACHE_CLIENT_PROGRESS_TIMEOUT",), "60s",
            "A blob response whose client takes no bytes for this long is dropped"),
    Setting("max-connections", ("REGCACHE_MAX_CONNECTIONS",), "auto",
            "Most client connections open at once (health checks still answer past it); auto fits the "
            "open-file limit, unlimited for none"),
    Setting("max-connections-per-client", ("REGCACHE_MAX_CONNECTIONS_PER_CLIENT",), "256",
            "Most connections open at once from one client address; unlimited for none"),
    Setting("log-format", ("REGCACHE_LOG_FORMAT",), "text",
            "text (twistd's lines, for terminals) or json (one JSON object per line, for Fluent Bit)"),
    Setting("revalidate-deadline", ("REGCACHE_REVALIDATE_DEADLINE",), "300ms",
            "Longest a pull of a cached tag waits for its revalidation before the cached copy is served "
            "(the check goes on in the background)"),
    Setting("ratelimit-probe", ("REGCACHE_RATELIMIT_PROBE",), "off",
            "Check each Docker Hub credential's remaining pulls this often with Docker Hub's free "
            "ratelimitpreview/test HEAD (e.g. 10m), or off"),
    Setting("metrics-listen", ("REGCACHE_METRICS_LISTEN",), None,
            "Serve /metrics on this Twisted endpoint of its own (e.g. tcp:9102:interface=10.0.0.5) "
            "instead of on --listen"),
    Setting("htpasswd", ("REGCACHE_HTPASSWD",), None,
            "Client authentication: an htpasswd file of bcrypt entries (htpasswd -B); turns authentication on"),
    Setting("anonymous", ("REGCACHE_ANONYMOUS",), None,
            "With authentication on, clients without credentials outside the trusted networks: "
            "deny (the default), cached-only (pull only what is cached) or allow"),
    Setting("trusted-networks", ("REGCACHE_TRUSTED_NETWORKS",), None,
            "Comma-separated networks whose clients need no credentials, e.g. 10.0.0.0/8,fd00::/8; "
            "turns authentication on"),
    Setting("trusted-proxies", ("REGCACHE_TRUSTED_PROXIES",), None,
            "Comma-separated addresses or networks of proxies whose X-Forwarded-For names the client"),
    Setting("storage-backend", ("REGCACHE_STORAGE_BACKEND",), "local",
            "local (the cache directory alone) or s3: a bucket shared by every replica behind the cache "
            "directory, one upstream fetch per blob across them (docs/kubernetes.md)"),
    Setting("s3-endpoint", ("REGCACHE_S3_ENDPOINT",), None,
            "The object store's URL, e.g. https://storage.googleapis.com, https://s3.eu-west-1.amazonaws.com, "
            "http://seaweedfs:8333"),
    Setting("s3-bucket", ("REGCACHE_S3_BUCKET",), None, "The bucket of the shared level"),
    Setting("s3-region", ("REGCACHE_S3_REGION", "AWS_REGION"), "us-east-1",
            "The bucket's region, as requests are signed for it (GCS: auto)"),
    Setting("s3-prefix", ("REGCACHE_S3_PREFIX",), "", "Prepended to every object name, e.g. regcache/"),
    Setting("s3-access-key", ("REGCACHE_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"), None,
            "The access key id (GCS: the HMAC key's id)"),
    Setting("s3-secret-key-file", ("REGCACHE_S3_SECRET_KEY_FILE",), None,
            "File holding the secret key (or set REGCACHE_S3_SECRET_KEY / AWS_SECRET_ACCESS_KEY)"),
    Setting("s3-redirect", ("REGCACHE_S3_REDIRECT",), None,
            "Answer a blob GET held in the bucket with a 307 to a presigned URL, so its bytes bypass regcache "
            "(a flag; only for a bucket every client can reach)"),
    Setting("s3-max-size", ("REGCACHE_S3_MAX_SIZE",), "unlimited",
            "Size limit of the bucket's content, least recently used evicted first; unlimited for none"),
    Setting("s3-sweep-interval", ("REGCACHE_S3_SWEEP_INTERVAL",), "5m",
            "How often a replica tries to take the sweeper lease and sweep the bucket down to --s3-max-size"),
    Setting("advertise", ("REGCACHE_ADVERTISE",), None,
            "The URL other replicas reach this one at, for downloads they forward to it, e.g. "
            "http://$(POD_IP):5000"),
    Setting("lease-ttl", ("REGCACHE_LEASE_TTL",), "30s",
            "How long a replica's lease on a download lasts unless renewed: a dead replica's downloads are "
            "taken over this long after it died"),
    Setting("redis", ("REGCACHE_REDIS",), None,
            "redis://host:port: hold download leases in Redis instead of the bucket"),
)

#: The settings that are flags on the command line (present or not) and
#: yes/no words in the environment.
FLAGS = ("upstream-insecure", "s3-redirect")

#: What --storage-backend takes.
STORAGE_BACKENDS = ("local", "s3")

#: What --log-format takes (regcache.logs).
LOG_FORMATS = ("text", "json")

#: The client-authentication settings, by option name and config-file key.
_AUTH_OPTIONS = {"htpasswd": "htpasswd", "anonymous": "anonymous", "trusted-networks": "trusted_networks",
                 "trusted-proxies": "trusted_proxies"}

#: What ``anonymous`` may say: what a client without credentials, outside
#: the trusted networks, may do.
ANONYMOUS_MODES = ("deny", "cached-only", "allow")

_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50,
}

#: Bounds past which a value can only be a typo.  They keep every value a
#: finite number the reactor's timers and the store's byte counts can take:
#: a 400-digit number would otherwise become an infinite float or an
#: OverflowError far from the option that caused it.
MAX_DURATION = 3650 * 86400
MAX_SIZE = 2**60

#: The words that lift a bound.  Zero is not one of them: ``--max-stale 0``
#: means no stale serving at all, as ``0s`` does.
_UNLIMITED = ("unlimited", "none", "off")


def parse_duration(name: str, text: str) -> float:
    """
    Seconds from ``90``, ``90s``, ``5m``, ``1.5h``, ``2d`` or ``300ms``.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|[smhd]?)\s*", text.lower())
    if not m:
        raise ConfigError(f"--{name}: not a duration: {text!r} (use e.g. 60s, 5m, 1h)")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION:
        raise ConfigError(f"--{name}: too long: {text[:40]!r} (at most 3650d)")
    return seconds


def parse_size(name: str, text: str) -> int:
    """
    Bytes from ``1000``, ``500M`` (decimal) or ``64Gi`` (binary).
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?|b)?\s*", text.lower())
    if not m:
        raise ConfigError(f"--{name}: not a size: {text!r} (use e.g. 500M, 64Gi)")
    size = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
    if size > MAX_SIZE:
        raise ConfigError(f"--{name}: too large: {text[:40]!r} (at most 1024Pi)")
    if int(size) <= 0:
        raise ConfigError(f"--{name}: must be more than zero: {text!r} (or unlimited)")
    return int(size)


def _unlimited(text: str) -> bool:
    return text.strip().lower() in _UNLIMITED


def parse_upstream(text: str, where: str = "--upstream", hint: str = "--username and --password-file") -> str:
    """
    The registry root of an upstream URL; ``where`` names the setting and
    ``hint`` where credentials go instead, for the error.
    """
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: not an http(s) URL: {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{where}: no query, fragment or credentials in the URL (use {hint})")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{where}: bad port in {text!r}") from None
    # The registry's root, where regcache adds /v2/...: an upstream copied
    # with its API path would otherwise be asked for /v2/v2/...
    root = text.strip().rstrip("/")
    return root[: -len("/v2")] if parts.path.rstrip("/").endswith("/v2") else root


@dataclass(frozen=True)
class UpstreamURL:
    """One URL of an upstream, with the credentials regcache sends there."""

    url: str
    username: Optional[str] = None
    password: Optional[str] = None

    def __repr__(self) -> str:
        # Never let the password reach a log line or a traceback.
        return f"UpstreamURL({self.url!r}, username={self.username!r}, password={'<set>' if self.password else None})"


@dataclass(frozen=True)
class UpstreamConfig:
    """
    One upstream registry: what regcache calls it (its tags are filed under
    ``name``), the registry hosts and path alias clients reach it by, and
    the URLs it is fetched from, in order.
    """

    name: str
    hosts: Tuple[str, ...]
    urls: Tuple[UpstreamURL, ...]
    docker_hub: bool
    tag_ttl: float
    max_stale: Optional[float]
    connect_timeout: float
    header_timeout: float
    idle_timeout: float
    alias: Optional[str] = None
    realms: Tuple[str, ...] = ()
    revalidate_deadline: float = 0.3
    #: PEM of the CAs its TLS certificates are checked against; None for the system's trust store.
    ca: Optional[bytes] = None
    #: Its TLS certificates are not checked at all (asked for explicitly).
    insecure: bool = False


@dataclass(frozen=True)
class AuthSettings:
    """
    Client authentication, when it is on: the htpasswd file of users, what
    a client without credentials may do, the networks that need none, the
    proxies whose X-Forwarded-For is believed, and each group's users.
    """

    htpasswd: Optional[str] = None
    anonymous: str = "deny"
    trusted_networks: Tuple[Any, ...] = ()
    trusted_proxies: Tuple[Any, ...] = ()
    groups: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)


def parse_networks(name: str, values: Sequence[str]) -> tuple:
    """
    ``10.0.0.0/8``, ``fd00::/8`` or one address (``192.0.2.7``) each, as
    ipaddress networks.  A network with host bits set is refused rather
    than widened: ``10.1.2.3/8`` is more likely a typo than ``10.0.0.0/8``.
    An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) is its IPv4 one,
    as client addresses are (clientauth.client_ip).
    """
    out = []
    for value in values:
        try:
            network = ipaddress.ip_network(str(value).strip())
        except ValueError as e:
            raise ConfigError(f"{name}: not a network: {str(value)[:60]!r} ({e})") from None
        mapped = network.network_address.ipv4_mapped if network.version == 6 else None
        if mapped is not None and network.prefixlen >= 96:
            network = ipaddress.ip_network((mapped, network.prefixlen - 96))
        out.append(network)
    return tuple(out)


def _comma_list(text: str) -> list:
    return [part for part in (p.strip() for p in text.split(",")) if part]


def auth_settings(given: Mapping[str, str], section: Optional[Mapping[str, Any]]) -> Optional[AuthSettings]:
    """
    The client-authentication settings of the options ``given`` over the
    config file's ``auth`` section, or None when neither turns it on: then
    every client is let in, as before authentication existed.
    """
    options = {key: given[name] for name, key in _AUTH_OPTIONS.items() if name in given}
    if section is None and not options:
        return None
    section = dict(section or {})
    anonymous = options.get("anonymous", section.get("anonymous", "deny")).strip()
    if anonymous not in ANONYMOUS_MODES:
        raise ConfigError(f"--anonymous: not one of {', '.join(ANONYMOUS_MODES)}: {anonymous!r}")
    networks = {}
    for key in ("trusted_networks", "trusted_proxies"):
        values = _comma_list(options[key]) if key in options else section.get(key, [])
        networks[key] = parse_networks(f"--{key.replace('_', '-')}", values)
    htpasswd = options.get("htpasswd", section.get("htpasswd"))
    return AuthSettings(
        htpasswd=os.path.abspath(htpasswd) if htpasswd else None,
        anonymous=anonymous,
        groups={g: tuple(users) for g, users in section.get("groups", {}).items()},
        **networks,
    )


@dataclass(frozen=True)
class Config:
    listen: str
    storage: str
    max_size: Optional[int]
    upstreams: Tuple[UpstreamConfig, ...]
    #: The name of the upstream for requests that name no registry.
    default: str
    #: The config file read, if any.
    file: Optional[str] = None
    client_header_timeout: float = 10.0
    client_progress_timeout: float = 60.0
    #: A number, None for no cap, or "auto": as many as the open-file limit
    #: can serve (service.py works it out).
    max_connections: Union[int, str, None] = "auto"
    max_connections_per_client: Optional[int] = 256
    #: Networks upstreams may lead to beyond the rule in regcache.addresses.
    upstream_allow: Tuple[Any, ...] = ()
    #: Bytes a second a blob download must average; 0 for no floor.
    min_download_rate: float = 10_000.0
    #: The pull policy's rules, for the upstreams that have some.
    policy: Tuple[RuleSet, ...] = ()
    #: One of LOG_FORMATS.
    log_format: str = "text"

    #: Seconds between rate-limit probes, or None for none.
    ratelimit_probe: Optional[float] = None
    #: The endpoint /metrics is served on instead of ``listen``, if any.
    metrics_listen: Optional[str] = None
    #: The repositories whose requests the metrics count by name.
    metrics_repositories: Tuple[str, ...] = ()
    #: Client authentication; None when it is off.
    auth: Optional[AuthSettings] = None
    #: The shared level (``--storage-backend s3``); None for local only.
    shared: Optional["SharedSettings"] = None


@dataclass(frozen=True)
class SharedSettings:
    """
    The shared level: the bucket every replica reads and fills, and how
    replicas agree which of them downloads a blob (regcache.leases).
    """

    bucket: BucketSettings
    #: Answer blob GETs with a 307 to a presigned URL of the bucket.
    redirect: bool = False
    #: Seconds a presigned URL works.
    redirect_expiry: float = 900.0
    #: Size limit of the bucket's content, or None.
    max_size: Optional[int] = None
    #: Seconds between the sweeps that keep the bucket under max_size.
    sweep_interval: float = 300.0
    #: The URL peers reach this replica at.
    advertise: Optional[str] = None
    lease_ttl: float = 30.0
    #: A redis:// URL, to hold leases in Redis rather than the bucket.
    redis: Optional[str] = None


def restart_needed(old: Config, new: Config) -> List[str]:
    """
    The settings (never their values: they hold passwords) that differ
    between a running config and a reread one, other than the pull policy,
    which is the one part a reload applies.
    """
    def value(config: Config, name: str):
        if name == "upstreams":  # a new password is reloaded (regcache.reload.credentials_reloader)
            return tuple(replace(u, urls=tuple(replace(url, password=None) for url in u.urls))
                         for u in config.upstreams)
        return getattr(config, name)

    return [f.name for f in fields(Config) if f.name != "policy" and value(old, f.name) != value(new, f.name)]


def explicit(cli: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> dict:
    """
    The raw string value of every setting given on the command line, else
    by the first environment name that is set; the rest are absent.
    """
    raw = {}
    for s in SETTINGS:
        value = cli.get(s.name)
        if value is None:
            value = next((environ[e] for e in s.env if environ.get(e)), None)
        if value is not None:
            raw[s.name] = value
    return raw


def merge(cli: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> dict:
    """
    The raw string value of every setting: the command line if given, then
    the first environment name that is set, then the default.
    """
    raw = explicit(cli, environ)
    return {s.name: raw.get(s.name, s.default) for s in SETTINGS}


def _duration(name: str, text: str, positive: bool = False) -> float:
    seconds = parse_duration(name, text)
    if positive and seconds <= 0:
        raise ConfigError(f"--{name}: must be more than zero")
    return seconds


def _limit_duration(name: str, text: str) -> Optional[float]:
    return None if _unlimited(text) else parse_duration(name, text)


_TIMEOUTS = ("connect-timeout", "header-timeout", "idle-timeout")


def _windows(raw: Mapping[str, str]) -> dict:
    """The per-upstream durations of the options given in ``raw``, by field name."""
    out = {}
    if "tag-ttl" in raw:
        out["tag_ttl"] = _duration("tag-ttl", raw["tag-ttl"])
    if "max-stale" in raw:
        out["max_stale"] = _limit_duration("max-stale", raw["max-stale"])
    for name in _TIMEOUTS:
        if name in raw:
            out[name.replace("-", "_")] = _duration(name, raw[name], positive=True)
    if "revalidate-deadline" in raw:
        out["revalidate_deadline"] = _duration("revalidate-deadline", raw["revalidate-deadline"])
    return out


def _count(name: str, text: str, auto: bool = False) -> Union[int, str, None]:
    """A positive whole number; None for unlimited; "auto" where ``auto`` allows it."""
    word = text.strip().lower()
    if _unlimited(word):
        return None
    if auto and word == "auto":
        return "auto"
    if not (word.isascii() and word.isdigit()) or len(word) > 9 or int(word) <= 0:
        raise ConfigError(f"--{name}: not a positive whole number: {text[:40]!r}"
                          + (" (or auto, or unlimited)" if auto else " (or unlimited)"))
    return int(word)


def _read_password(where: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path!r}: {e.strerror}")


def read_ca(where: str, path: str) -> bytes:
    """The PEM certificates of a CA file, read once at start-up; ConfigError naming ``where`` if it has none."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path!r}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(f"{where}: {path!r} holds no PEM certificate")
    return pem


def parse_flag(name: str, text: str) -> bool:
    """yes/no, true/false, on/off, 1/0: how a flag is set in the environment."""
    word = text.strip().lower()
    if word in ("1", "yes", "true", "on"):
        return True
    if word in ("0", "no", "false", "off", ""):
        return False
    raise ConfigError(f"--{name}: not yes or no: {text[:40]!r}")


def single_upstream(raw: Mapping[str, Optional[str]], cli: Mapping[str, Optional[str]]) -> UpstreamConfig:
    """
    The one upstream the single-upstream options describe.  Its name is
    the one its tags were filed under before config files existed, so an
    existing cache keeps its tags.
    """
    password = raw["password"]
    if raw["password-file"]:
        if cli.get("password") is not None:
            raise ConfigError("--password and --password-file: give only one")
        password = _read_password("--password-file", raw["password-file"])
    if password and not raw["username"]:
        raise ConfigError("--password needs --username")
    url = parse_upstream(raw["upstream"])
    ca = read_ca("--upstream-ca", raw["upstream-ca"]) if raw["upstream-ca"] else None
    insecure = parse_flag("upstream-insecure", raw["upstream-insecure"] or "")
    if ca and insecure:
        raise ConfigError("--upstream-ca and --upstream-insecure: give only one")
    parts = urlsplit(url)
    hub = parts.hostname in DOCKER_HUB_HOSTS + ("registry.hub.docker.com",)
    hosts = tuple(dict.fromkeys([parts.netloc.lower(), *DOCKER_HUB_HOSTS]))
    windows = {
        "tag_ttl": _duration("tag-ttl", raw["tag-ttl"]),
        "max_stale": _limit_duration("max-stale", raw["max-stale"]),
        **{n.replace("-", "_"): _duration(n, raw[n], positive=True) for n in _TIMEOUTS},
        "revalidate_deadline": _duration("revalidate-deadline", raw["revalidate-deadline"]),
    }
    return UpstreamConfig(
        name="docker.io" if hub else parts.netloc,
        hosts=hosts,
        urls=(UpstreamURL(url, raw["username"] or None, password or None),),
        docker_hub=hub,
        realms=DOCKER_HUB_REALMS if hub else (),
        ca=ca,
        insecure=insecure,
        **windows,
    )


def load(cli: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> Config:
    """
    Build the one Config the process runs with, or raise ConfigError.
    """
    given = explicit(cli, environ)
    raw = merge(cli, environ)
    if not raw["listen"] or not raw["listen"].strip():
        raise ConfigError("--listen: empty endpoint")
    file = raw["config"]
    cache: dict = {}
    auth_section = None
    storage_section: Mapping[str, Any] = {}
    if file:
        for name in ("upstream", "username", "password", "password-file", "upstream-ca", "upstream-insecure"):
            if name in given:
                raise ConfigError(f"--{name}: the upstreams are set in the config file {file} (--config)")
        document = read(file, environ)
        cache = document.cache
        overrides = _windows(given)
        upstreams = tuple(replace(u, **overrides) for u in document.upstreams)
        default, policy = document.default, document.policy
        observed = document.metrics
        auth_section = document.auth
        storage_section = document.storage
    else:
        upstream = single_upstream(raw, cli)
        upstreams, default, policy = (upstream,), upstream.name, ()
        observed = {}
    storage = given.get("storage") or cache.get("storage") or _default_storage()
    if "max-size" in given or "max_size" not in cache:
        max_size = None if _unlimited(raw["max-size"]) else parse_size("max-size", raw["max-size"])
    else:
        max_size = cache["max_size"]
    log_format = raw["log-format"].strip().lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format: not a log format: {raw['log-format']!r} (use text or json)")
    probe = given.get("ratelimit-probe")
    probe_every = (_probe_interval("ratelimit-probe", probe) if probe is not None
                   else observed.get("ratelimit_probe"))
    metrics_listen = (given.get("metrics-listen") or "").strip() or observed.get("listen")
    return Config(
        listen=raw["listen"].strip(),
        storage=os.path.abspath(storage),
        max_size=max_size,
        upstreams=upstreams,
        default=default,
        file=file or None,
        policy=policy,
        client_header_timeout=_duration("client-header-timeout", raw["client-header-timeout"], positive=True),
        client_progress_timeout=_duration("client-progress-timeout", raw["client-progress-timeout"], positive=True),
        max_connections=_count("max-connections", raw["max-connections"], auto=True),
        max_connections_per_client=_count("max-connections-per-client", raw["max-connections-per-client"]),
        upstream_allow=parse_networks("--upstream-allow", _comma_list(raw["upstream-allow"] or "")),
        min_download_rate=(0.0 if _unlimited(raw["min-download-rate"])
                           else float(parse_size("min-download-rate", raw["min-download-rate"]))),
        log_format=log_format,
        ratelimit_probe=probe_every,
        metrics_listen=metrics_listen,
        metrics_repositories=tuple(observed.get("repositories", ())),
        auth=auth_settings(given, auth_section),
        shared=shared_settings(given, raw, storage_section, environ),
    )


def shared_settings(given: Mapping[str, str], raw: Mapping[str, Optional[str]], section: Mapping[str, Any],
                    environ: Mapping[str, str]) -> Optional[SharedSettings]:
    """
    The shared level's settings, each from the command line or environment
    if given there, else the config file's ``storage`` section, else the
    default; None with the local backend.
    """
    s3 = section.get("s3", {})
    leases = section.get("leases", {})

    def value(option: str, entry: Optional[Any]) -> Optional[str]:
        if option in given:
            return given[option]
        return str(entry) if entry is not None else raw.get(option)

    backend = (value("storage-backend", section.get("backend")) or "local").strip().lower()
    if backend not in STORAGE_BACKENDS:
        raise ConfigError(f"--storage-backend: not a storage backend: {backend!r} (use local or s3)")
    if backend == "local":
        return None
    endpoint = value("s3-endpoint", s3.get("endpoint"))
    bucket = value("s3-bucket", s3.get("bucket"))
    access = value("s3-access-key", s3.get("access_key"))
    for option, got in (("s3-endpoint", endpoint), ("s3-bucket", bucket), ("s3-access-key", access)):
        if not got:
            raise ConfigError(f"--{option}: needed with --storage-backend s3")
    scheme = urlsplit(endpoint).scheme
    if scheme not in ("http", "https") or not urlsplit(endpoint).hostname:
        raise ConfigError(f"--s3-endpoint: not an http(s) URL: {endpoint!r}")
    # The command line and the environment win over the file, the secret
    # as every other key: a secret given in the environment is never
    # overridden by the file's secret_key_file.
    from_env = next((environ[e] for e in ("REGCACHE_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY") if environ.get(e)),
                    None)
    secret_file = given.get("s3-secret-key-file") or (None if from_env else s3.get("secret_key_file"))
    secret = _read_password("--s3-secret-key-file", secret_file) if secret_file else from_env
    if not secret:
        raise ConfigError("--s3-secret-key-file: needed with --storage-backend s3 "
                          "(or set REGCACHE_S3_SECRET_KEY)")
    redirect = parse_flag("s3-redirect", value("s3-redirect", s3.get("redirect")) or "")
    max_size_text = value("s3-max-size", s3.get("max_size")) or "unlimited"
    advertise = value("advertise", section.get("advertise"))
    if advertise and urlsplit(advertise).scheme not in ("http", "https"):
        raise ConfigError(f"--advertise: not an http(s) URL: {advertise!r}")
    redis = value("redis", leases.get("redis"))
    if redis and urlsplit(redis).scheme != "redis":
        raise ConfigError(f"--redis: not a redis:// URL: {redis!r}")
    return SharedSettings(
        bucket=BucketSettings(endpoint.rstrip("/"), bucket, access, secret,
                              region=value("s3-region", s3.get("region")) or "us-east-1",
                              prefix=value("s3-prefix", s3.get("prefix")) or ""),
        redirect=redirect,
        max_size=None if _unlimited(max_size_text) else parse_size("s3-max-size", max_size_text),
        sweep_interval=_duration("s3-sweep-interval", value("s3-sweep-interval", s3.get("sweep_interval")) or "5m",
                                 positive=True),
        advertise=advertise.rstrip("/") if advertise else None,
        lease_ttl=_duration("lease-ttl", value("lease-ttl", leases.get("ttl")) or "30s", positive=True),
        redis=redis or None,
    )


def _probe_interval(name: str, text: str) -> Optional[float]:
    """Seconds between rate-limit probes, or None for ``off``; more often than a minute only pesters Hub."""
    if _unlimited(text):
        return None
    seconds = parse_duration(name, text)
    if seconds < 60:
        raise ConfigError(f"--{name}: at least 1m, or off: {text!r}")
    return seconds




# The config file


@dataclass(frozen=True)
class Document:
    """What a config file declares, checked and typed."""

    upstreams: Tuple[UpstreamConfig, ...]
    default: str
    #: ``storage`` and ``max_size`` if the file sets them.
    cache: Mapping[str, Any]
    policy: Tuple[RuleSet, ...]
    #: ``listen``, ``ratelimit_probe`` (seconds or None) and
    #: ``repositories`` if the file sets them.
    metrics: Mapping[str, Any]
    #: The ``auth`` section, checked, if the file has one.
    auth: Optional[Mapping[str, Any]] = None
    #: The ``storage`` section as written (checked by the schema), if any.
    storage: Mapping[str, Any] = field(default_factory=dict)


def _schema() -> dict:
    with open(_SCHEMA_PATH, encoding="utf-8") as f:
        return json.load(f)


def _key_path(path) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


class _Located:
    """
    Error messages for one file: the key path and the line its node starts
    on, found by walking the composed YAML the way the data was walked.
    """

    def __init__(self, file: str, root):
        self.file = file
        self.root = root

    def _node(self, path):
        node = self.root
        for part in path:
            node = _child(node, part)
            if node is None:
                return None
        return node

    def line(self, path) -> Optional[int]:
        node = self._node(path)
        return node.start_mark.line + 1 if node is not None else None

    def key_line(self, path, key: str) -> Optional[int]:
        """The line of ``key`` itself within the mapping at ``path``."""
        import yaml

        parent = self._node(path)
        if isinstance(parent, yaml.MappingNode):
            for k, _ in parent.value:
                if k.value == key:
                    return k.start_mark.line + 1
        return self.line(path)

    def error(self, path, message: str, line: Optional[int] = None) -> ConfigError:
        line = line or self.line(path) or self.line(path[:-1]) or 1
        return ConfigError(f"{self.file}:{line}: {_key_path(path)}: {message}")


def _child(node, part):
    import yaml

    if isinstance(node, yaml.MappingNode):
        return next((v for k, v in node.value if k.value == part), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part]
    return None


def _schema_error(where: _Located, error: "jsonschema.ValidationError") -> ConfigError:
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = error.schema.get("properties", {})
        extra = sorted(k for k in error.instance if k not in allowed)[0]
        return where.error(path + [extra], "unknown key", where.key_line(path, extra))
    if error.validator == "required":
        return where.error(path, error.message.replace("is a required property", "is required"))
    if error.validator == "oneOf" and all(list(s) == ["required"] for s in error.validator_value):
        keys = [k for s in error.validator_value for k in s["required"]]
        return where.error(path, f"give exactly one of {', '.join(keys)}")
    return where.error(path, error.message)


def read(file: str, environ: Mapping[str, str]) -> Document:
    """
    Parse, validate and type the config file ``file``, or raise a
    ConfigError naming the file, the line and the key at fault.
    """
    # Imported here, not at the top: a mirror run without a config file
    # (the embedded defaults) starts a tenth of a second sooner, which is
    # what a pod waits before /readyz.
    import jsonschema
    import yaml

    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"--config: cannot read {file!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {file} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{file}{line}: not valid YAML: {problem}") from None
    where = _Located(file, root)
    if data is None:
        raise where.error([], "the file is empty: it must declare upstreams")
    errors = list(jsonschema.Draft202012Validator(_schema()).iter_errors(data))
    if errors:
        raise _schema_error(where, jsonschema.exceptions.best_match(errors))
    if "upstreams" not in data:
        raise where.error([], "'upstreams' is required")
    upstreams = tuple(_upstream(where, i, u, environ) for i, u in enumerate(data["upstreams"]))
    _check_unique(where, upstreams)
    return Document(upstreams, _default(where, data, upstreams), _cache(where, data.get("cache", {})),
                    _policy(where, data.get("policy", {}), upstreams),
                    _metrics(where, data.get("metrics", {})),
                    _auth(where, data["auth"]) if "auth" in data else None, data.get("storage", {}))


def _upstream(where: _Located, i: int, u: Mapping[str, Any], environ: Mapping[str, str]) -> UpstreamConfig:
    path = ["upstreams", i]
    urls = tuple(_url(where, path + ["urls", j], entry, environ) for j, entry in enumerate(u["urls"]))

    def duration(key: str, default: str, positive: bool = False, limit: bool = False):
        text = str(u.get(key, default))
        try:
            if limit and _unlimited(text):
                return None
            return _duration(key, text, positive)
        except ConfigError as e:
            raise where.error(path + [key], str(e).split(": ", 1)[1]) from None

    hosts = tuple(h.lower() for h in u.get("hosts", ()))
    if not hosts:
        hosts = tuple(dict.fromkeys(urlsplit(url.url).netloc.lower() for url in urls))
    docker_hub = u.get("docker_hub", any(h in DOCKER_HUB_HOSTS for h in hosts))
    if docker_hub and "hosts" not in u:
        hosts = tuple(dict.fromkeys(hosts + DOCKER_HUB_HOSTS))
    return UpstreamConfig(
        name=u["name"],
        hosts=hosts,
        urls=urls,
        docker_hub=docker_hub,
        tag_ttl=duration("tag_ttl", "60s"),
        max_stale=duration("max_stale", "unlimited", limit=True),
        connect_timeout=duration("connect_timeout", "5s", positive=True),
        header_timeout=duration("header_timeout", "5s", positive=True),
        idle_timeout=duration("idle_timeout", "15s", positive=True),
        revalidate_deadline=duration("revalidate_deadline", "300ms"),
        alias=u.get("alias"),
        realms=tuple(r.lower() for r in u.get("realms", DOCKER_HUB_REALMS if docker_hub else ())),
        ca=_file_ca(where, path, u),
        insecure=u.get("insecure", False),
    )


def _file_ca(where: _Located, path, u: Mapping[str, Any]) -> Optional[bytes]:
    if "ca" not in u:
        return None
    if u.get("insecure"):
        raise where.error(path + ["insecure"], "give ca or insecure, not both")
    try:
        return read_ca("ca", u["ca"])
    except ConfigError as e:
        raise where.error(path + ["ca"], str(e).split(": ", 1)[1]) from None


def _url(where: _Located, path, entry, environ: Mapping[str, str]) -> UpstreamURL:
    if isinstance(entry, str):
        entry = {"url": entry}
        url_path = path
    else:
        url_path = path + ["url"]
    try:
        url = parse_upstream(entry["url"], "url", "username with password, password_env or password_file")
    except ConfigError as e:
        raise where.error(url_path, str(e).split(": ", 1)[1]) from None
    sources = [k for k in ("password", "password_env", "password_file") if k in entry]
    if len(sources) > 1:
        raise where.error(path + [sources[1]], f"give only one of {', '.join(sources)}")
    password = entry.get("password")
    if "password_env" in entry:
        password = environ.get(entry["password_env"])
        if not password:
            raise where.error(path + ["password_env"], f"the environment variable {entry['password_env']} is not set")
    if "password_file" in entry:
        try:
            password = _read_password("x", entry["password_file"])
        except ConfigError as e:
            raise where.error(path + ["password_file"], str(e).split(": ", 1)[1]) from None
    if sources and "username" not in entry:
        raise where.error(path + [sources[0]], "a password needs a username")
    if "username" in entry and not sources:
        raise where.error(path + ["username"], "a username needs password, password_env or password_file")
    return UpstreamURL(url, entry.get("username"), password)


def _check_unique(where: _Located, upstreams: Tuple[UpstreamConfig, ...]) -> None:
    """
    Names, hosts and aliases each pick one upstream: a host two upstreams
    answer for would make which registry's content a client gets a matter
    of order.
    """
    seen: dict = {}
    for i, u in enumerate(upstreams):
        for kind, values in (("name", [u.name]), ("hosts", u.hosts), ("alias", [u.alias] if u.alias else [])):
            for value in values:
                other = seen.setdefault((kind, value.lower()), i)
                if other != i:
                    raise where.error(["upstreams", i, kind], f"{value!r} is already in upstreams[{other}]")


def _default(where: _Located, data: Mapping[str, Any], upstreams: Tuple[UpstreamConfig, ...]) -> str:
    names = [u.name for u in upstreams]
    if "default" in data:
        if data["default"] not in names:
            raise where.error(["default"], f"no upstream is named {data['default']!r} (upstreams: {', '.join(names)})")
        return data["default"]
    return next((u.name for u in upstreams if "docker.io" in u.hosts), names[0])


def _cache(where: _Located, cache: Mapping[str, Any]) -> dict:
    out: dict = {}
    if "storage" in cache:
        out["storage"] = cache["storage"]
    if "max_size" in cache:
        text = str(cache["max_size"])
        try:
            out["max_size"] = None if _unlimited(text) else parse_size("max_size", text)
        except ConfigError as e:
            raise where.error(["cache", "max_size"], str(e).split(": ", 1)[1]) from None
    return out


def _policy(where: _Located, policy: Mapping[str, Any], upstreams: Tuple[UpstreamConfig, ...]) -> Tuple[RuleSet, ...]:
    by_name = {u.name: u for u in upstreams}
    sets = []
    for name, spec in policy.items():
        if name not in by_name:
            raise where.error(["policy", name], f"no upstream is named {name!r} (upstreams: {', '.join(by_name)})",
                              where.key_line(["policy"], name))
        rules = tuple(_rule(where, ["policy", name, "rules", i], i, r, by_name[name].docker_hub)
                      for i, r in enumerate(spec.get("rules", ())))
        sets.append(RuleSet(name, rules, spec["default"] == "allow"))
    return tuple(sets)


def _listed(value) -> Tuple[bool, Tuple[str, ...]]:
    """(whether the file wrote a list, the values) of a pattern or a list of them."""
    return (True, tuple(value)) if isinstance(value, list) else (False, (value,))


def _rule(where: _Located, path, index: int, spec: Mapping[str, Any], docker_hub: bool) -> Rule:
    allow = "allow" in spec
    key = "allow" if allow else "deny"
    listed, names = _listed(spec[key])
    for j, name in enumerate(names):
        at = path + [key] + ([j] if listed else [])
        _pattern(where, at, name_regex, name)
        if docker_hub and "/" not in name and "**" not in name:
            raise where.error(at, f"{name!r} matches no Docker Hub repository: they are named library/{name} "
                                  "and owner/name, so write library/...")
    tags = None
    if "tags" in spec and spec["tags"] is not False:
        listed, tags = _listed(spec["tags"])
        for j, tag in enumerate(tags):
            _pattern(where, path + ["tags"] + ([j] if listed else []), tag_regex, tag)
    elif "tags" in spec:
        tags = ()
    # A deny narrowed to some tags denies those tags, not the digests
    # they share with the tags it leaves allowed.
    digests = spec.get("digests", allow or not tags)
    if tags == () and not digests:
        raise where.error(path + ["digests"], "with tags: false as well the rule matches no pull")
    return Rule(index, allow, names, tags, digests, frozenset(spec.get("users", ())),
                frozenset(spec.get("groups", ())))


def _pattern(where: _Located, path, translate, pattern: str) -> None:
    try:
        translate(pattern)
    except PatternError as e:
        raise where.error(path, str(e)) from None


def _metrics(where: _Located, metrics: Mapping[str, Any]) -> dict:
    out = dict(metrics)
    if "ratelimit_probe" in metrics:
        try:
            out["ratelimit_probe"] = _probe_interval("ratelimit_probe", str(metrics["ratelimit_probe"]))
        except ConfigError as e:
            raise where.error(["metrics", "ratelimit_probe"], str(e).split(": ", 1)[1]) from None
    return out


#: The groups the policy gives every client it applies to; a group of the
#: same name in the file would silently merge with one of them.
_BUILT_IN_GROUPS = {ANONYMOUS: "clients without credentials", TRUSTED: "clients on a trusted network"}


def _auth(where: _Located, auth: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``auth`` section, its networks and group names checked where the file names them."""
    for name in auth.get("groups", {}):
        if name in _BUILT_IN_GROUPS:
            raise where.error(["auth", "groups", name], f"{name!r} is a built-in group ({_BUILT_IN_GROUPS[name]}): "
                              "give yours another name")
    for key in ("trusted_networks", "trusted_proxies"):
        for i, value in enumerate(auth.get(key, [])):
            try:
                parse_networks(key, [value])
            except ConfigError as e:
                raise where.error(["auth", key, i], str(e).split(": ", 1)[1]) from None
    return auth
