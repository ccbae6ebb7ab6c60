# test-case-name: tests.test_config
"""
The settings regcache runs with, merged once from the command line, the
environment and the defaults, in that order of precedence.

Environment names include distribution's (``REGISTRY_PROXY_*``), so regcache
drops in where ``registry:2`` ran in proxy mode.  Everything is coerced and
checked here, so the rest of the code only ever sees valid, typed values and a
bad value stops start-up with one line that names it.
"""

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple
from urllib.parse import urlsplit

DOCKER_HUB = "https://registry-1.docker.io"


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
)

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
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
    Seconds from ``90``, ``90s``, ``5m``, ``1.5h`` or ``2d``.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
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


def parse_upstream(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--upstream: not an http(s) URL: {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(
            "--upstream: no query, fragment or credentials in the URL "
            "(use --username and --password-file)"
        )
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"--upstream: bad port in {text!r}") from None
    # The registry's root, where regcache adds /v2/...: an upstream copied
    # with its API path would otherwise be asked for /v2/v2/...
    root = text.strip().rstrip("/")
    return root[: -len("/v2")] if parts.path.rstrip("/").endswith("/v2") else root


@dataclass(frozen=True)
class Config:
    listen: str
    storage: str
    upstream: str
    username: Optional[str]
    password: Optional[str]
    tag_ttl: float
    max_stale: Optional[float]
    max_size: Optional[int]
    connect_timeout: float
    header_timeout: float
    idle_timeout: float

    def __repr__(self) -> str:
        # Never let the password reach a log line or a traceback.
        shown = {k: v for k, v in vars(self).items() if k != "password"}
        shown["password"] = "<set>" if self.password else None
        return f"Config({shown})"


def merge(cli: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> dict:
    """
    The raw string value of every setting: the command line if given, then
    the first environment name that is set, then the default.
    """
    raw = {}
    for s in SETTINGS:
        value = cli.get(s.name)
        if value is None:
            value = next((environ[e] for e in s.env if environ.get(e)), None)
        if value is None:
            value = s.default
        raw[s.name] = value
    return raw


def load(cli: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> Config:
    """
    Build the one Config the process runs with, or raise ConfigError.
    """
    raw = merge(cli, environ)
    password = raw["password"]
    if raw["password-file"]:
        if cli.get("password") is not None:
            raise ConfigError("--password and --password-file: give only one")
        try:
            with open(raw["password-file"], encoding="utf-8") as f:
                password = f.read().strip()
        except OSError as e:
            raise ConfigError(f"--password-file: cannot read {raw['password-file']!r}: {e.strerror}")
    if password and not raw["username"]:
        raise ConfigError("--password needs --username")
    for name in ("tag-ttl", "connect-timeout", "header-timeout", "idle-timeout"):
        parse_duration(name, raw[name])
    for name in ("connect-timeout", "header-timeout", "idle-timeout"):
        if parse_duration(name, raw[name]) <= 0:
            raise ConfigError(f"--{name}: must be more than zero")
    if not raw["listen"] or not raw["listen"].strip():
        raise ConfigError("--listen: empty endpoint")
    return Config(
        listen=raw["listen"].strip(),
        storage=os.path.abspath(raw["storage"] or _default_storage()),
        upstream=parse_upstream(raw["upstream"]),
        username=raw["username"] or None,
        password=password or None,
        tag_ttl=parse_duration("tag-ttl", raw["tag-ttl"]),
        max_stale=None if _unlimited(raw["max-stale"]) else parse_duration("max-stale", raw["max-stale"]),
        max_size=None if _unlimited(raw["max-size"]) else parse_size("max-size", raw["max-size"]),
        connect_timeout=parse_duration("connect-timeout", raw["connect-timeout"]),
        header_timeout=parse_duration("header-timeout", raw["header-timeout"]),
        idle_timeout=parse_duration("idle-timeout", raw["idle-timeout"]),
    )
