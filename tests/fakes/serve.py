# -*- test-case-name: tests.test_fake_hub -*-
"""
The fake Docker Hub as a subprocess, and a stdlib-only handle on it.

Real-process tests (skopeo, ctr, the mirror under twistd) need the fake on
real sockets, but pytest should hold no reactor; so the fake runs in its own
process::

    python -m tests.fakes.serve --images-dir DIR [--large-size BYTES]
        [--users alice:secret ...] [--private REPO[=OWNER] ...]
        [--token-ttl S] [--rate-limit N | --no-rate-limit] [--catalog hub|ghcr]

It generates (or reuses) the standard and moved images in DIR, plus a
signature of library/small:1 (a referrer, also its ``.sig`` tag); with
``--catalog ghcr``: the ghcr-like ``owner/app:v1`` instead, behind its own
token realm, as a second registry.  It listens on
four ephemeral ports of 127.0.0.1, prints ONE JSON line on stdout and runs
until killed::

    {"registry": "http://127.0.0.1:P1", "auth": "http://127.0.0.1:P2",
     "cdn": "http://127.0.0.1:P3", "control": "http://127.0.0.1:P4",
     "images": {"library/small:1": "sha256:...", ...},
     "artifacts": {"library/small:sha256-<hex>.sig": "sha256:..."},
     "alternates": {"library/small:1#2": "sha256:...", ...}}

Warnings and errors are logged to stderr.  ``FakeHubProcess`` starts it and
talks to the control port with urllib::

    with FakeHubProcess(tmp_path / "images", large_size=4 * MiB) as hub:
        hub.registry_url, hub.registry_host        # http://127.0.0.1:P, 127.0.0.1:P
        hub.fault("status", scope="manifests", status=503, times=1)
        hub.stats()["cdn_blob_gets"]
"""

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

from tests.fakes.images import LARGE_SIZE
from tests.processes import terminate

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.fakes.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--images-dir", required=True, type=Path)
    p.add_argument("--large-size", type=int, default=LARGE_SIZE, help="bytes of library/large's one layer")
    p.add_argument("--users", action="append", default=[], metavar="USER:PASSWORD")
    p.add_argument("--private", action="append", default=[], metavar="REPO[=OWNER]",
                   help="a private repo with ci/private:1's content; owner defaults to the first user")
    p.add_argument("--token-ttl", type=int, default=300)
    p.add_argument("--rate-limit", type=int, default=100000)
    p.add_argument("--no-rate-limit", action="store_true", help="send no rate-limit headers")
    p.add_argument("--interface", default="127.0.0.1")
    p.add_argument("--tls", nargs=2, metavar=("KEY", "CERT"),
                   help="serve the registry, auth and CDN ports over TLS with this key and certificate (PEM)")
    p.add_argument("--cdn-host", metavar="HOST:PORT",
                   help="the host blob redirects name instead of the CDN's own: a place regcache must refuse to go")
    p.add_argument("--catalog", choices=("hub", "ghcr"), default="hub",
                   help="Docker Hub's standard images, or a ghcr-like registry's owner/app:v1")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    from twisted.internet import reactor
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
                                textFileLogObserver)

    from tests.fakes.hub import FakeHub, LoopbackHub
    from tests.fakes.images import ghcr_images, moved_images, private as private_image, signature, standard_images

    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])], redirectStandardIO=False)
    users = dict(u.split(":", 1) for u in args.users)
    private = {}
    for spec in args.private:
        repo, _, owner = spec.partition("=")
        private[repo] = owner or next(iter(users), "")
    if args.catalog == "ghcr":
        images, alternates, artifacts = ghcr_images(args.images_dir), {}, []
        users, private, hidden = {}, {}, None
    else:
        images = standard_images(args.images_dir, large_size=args.large_size)
        alternates = moved_images(args.images_dir)
        artifacts = [signature(args.images_dir, images["library/small:1"])]
        hidden = private_image(args.images_dir)
    hub = FakeHub(
        [*images.values(), *artifacts],
        clock=reactor,
        users=users,
        private=private,
        private_image=hidden,
        alternates=alternates.values(),
        token_ttl=args.token_ttl,
        rate_limit=None if args.no_rate_limit else args.rate_limit,
    )
    tls = None
    if args.tls:
        from regcache.tls import ServedTLS

        tls = ServedTLS(*args.tls)
    server = LoopbackHub(hub, reactor, interface=args.interface, tls=tls).start()
    if args.cdn_host:
        hub.hosts["cdn"] = args.cdn_host
    line = dict(server.urls())
    line["images"] = {name: image.digest for name, image in images.items()}
    line["artifacts"] = {a.name: a.digest for a in artifacts}
    line["alternates"] = {FakeHub.catalog_key(image): image.digest for image in alternates.values()}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    reactor.run()


class FakeHubProcess:
    """
    The subprocess fake, driven with the stdlib only so pytest needs no
    reactor.  ``start()`` (or ``with``) waits for its JSON line.
    """

    def __init__(
        self,
        images_dir: Path,
        *,
        large_size: Optional[int] = None,
        users: Optional[Dict[str, str]] = None,
        private: Iterable[str] = (),
        token_ttl: Optional[int] = None,
        rate_limit: Optional[int] = None,
        no_rate_limit: bool = False,
        catalog: str = "hub",
        extra_args: Sequence[str] = (),
        start_timeout: float = 120.0,
    ):
        self.args = [sys.executable, "-m", "tests.fakes.serve", "--images-dir", str(images_dir)]
        if large_size is not None:
            self.args += ["--large-size", str(large_size)]
        for user, password in (users or {}).items():
            self.args += ["--users", f"{user}:{password}"]
        for repo in private:
            self.args += ["--private", repo]
        if token_ttl is not None:
            self.args += ["--token-ttl", str(token_ttl)]
        if rate_limit is not None:
            self.args += ["--rate-limit", str(rate_limit)]
        if no_rate_limit:
            self.args.append("--no-rate-limit")
        self.args += ["--catalog", catalog, *extra_args]
        self.start_timeout = start_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.info: Dict[str, Any] = {}

    def start(self) -> "FakeHubProcess":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        self.stderr = tempfile.NamedTemporaryFile(prefix="fake-hub-", suffix=".log", delete=False)
        self.log_path = Path(self.stderr.name)
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=self.stderr, stdin=subprocess.DEVNULL)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.start_timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"fake hub did not start: {self.log_path.read_text()[-2000:]}")
        self.info = json.loads(line)
        return self

    def __enter__(self) -> "FakeHubProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    @property
    def registry_url(self) -> str:
        return self.info["registry"]

    @property
    def registry_host(self) -> str:
        """``127.0.0.1:PORT``, as skopeo and containerd want it."""
        return self.registry_url.split("://", 1)[1]

    @property
    def auth_url(self) -> str:
        return self.info["auth"]

    @property
    def cdn_url(self) -> str:
        return self.info["cdn"]

    @property
    def control_url(self) -> str:
        return self.info["control"]

    @property
    def images(self) -> Dict[str, str]:
        """Image name -> top-level manifest digest."""
        return self.info["images"]

    def _call(self, method: str, what: str, body: Optional[dict] = None) -> Any:
        data = json.dumps(body or {}).encode() if method == "POST" else None
        request = urllib.request.Request(f"{self.control_url}/_fake/{what}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stats(self) -> Dict[str, Any]:
        return self._call("GET", "stats")

    def request_log(self) -> list:
        return self._call("GET", "log")

    def fault(self, kind: str, scope: str = "all", **params: Any) -> None:
        """See the fault kinds in tests/fakes/hub.py; ``down``/``up`` take ``host=``."""
        self._call("POST", "fault", dict(params, kind=kind, scope=scope))

    def clear_faults(self) -> None:
        self._call("POST", "fault", {"kind": "clear"})

    def down(self, host: str = "all") -> None:
        self._call("POST", "fault", {"kind": "down", "host": host})

    def up(self, host: str = "all") -> None:
        self._call("POST", "fault", {"kind": "up", "host": host})

    def reset(self) -> None:
        self._call("POST", "reset")

    def mode(self, mode: str, **params: Any) -> None:
        """normal, hung, refusing, 429-pull-limit or 429-abuse: see tests/fakes/hub.py."""
        self._call("POST", "mode", dict(params, mode=mode))

    def move_tag(self, repo: str, tag: str, image: Optional[str] = None, digest: Optional[str] = None) -> None:
        """``image`` is a catalog name such as ``library/small:1#2``."""
        body: Dict[str, Any] = {"repo": repo, "tag": tag}
        if image is not None:
            body["image"] = image
        if digest is not None:
            body["digest"] = digest
        self._call("POST", "tag", body)

    def delete_tag(self, repo: str, tag: str) -> None:
        self._call("POST", "tag", {"repo": repo, "tag": tag, "delete": True})

    def ratelimit(self, limit: Optional[int], remaining: Optional[int] = None,
                  retry_after: Optional[int] = None) -> None:
        self._call("POST", "ratelimit", {"limit": limit, "remaining": remaining, "retry_after": retry_after})

    def expire_tokens(self) -> None:
        self._call("POST", "expire-tokens")

    def referrers(self, enabled: bool) -> None:
        """Turn the referrers API on or off (off: 404, as a registry without it)."""
        self._call("POST", "referrers", {"enabled": enabled})


if __name__ == "__main__":
    main()
