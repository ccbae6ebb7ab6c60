# -*- test-case-name: tests.test_fake_hub -*-
"""
A real registry (Debian's ``docker-registry``, i.e. distribution 2.8) as a
subprocess, for tests and benchmarks that want a real upstream or a reference
mirror to compare against.

    with RealRegistry(tmp_path / "reg") as reg:                # plain registry
        reg.push_dir(export_dir(image, tmp_path / "small"), "library/small:1")
        reg.url, reg.host                                     # http://127.0.0.1:P, 127.0.0.1:P

    with RealRegistry(tmp_path / "proxy", proxy_remoteurl=hub.registry_url):
        ...                                                   # distribution's own pull-through cache

Uses the stdlib only; ``skopeo`` must be installed for ``push_dir`` and
``inspect_raw``.
"""

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional
from tests.processes import free_port, terminate

BINARY = "docker-registry"


def available() -> bool:
    return shutil.which(BINARY) is not None and shutil.which("skopeo") is not None


class RealRegistry:
    """
    ``docker-registry serve`` on 127.0.0.1 with filesystem storage under
    ``root``; a pull-through cache of ``proxy_remoteurl`` when given (with
    ``proxy_username``/``proxy_password`` for a private upstream).
    """

    def __init__(
        self,
        root: Path,
        *,
        port: Optional[int] = None,
        proxy_remoteurl: Optional[str] = None,
        proxy_username: Optional[str] = None,
        proxy_password: Optional[str] = None,
        htpasswd: Optional[Path] = None,
        log_level: str = "warn",
        start_timeout: float = 30.0,
    ):
        self.root = Path(root)
        #: A port picked here (none given) may be taken before the registry binds it: then another is picked.
        self._picked = port is None
        self.port = port or free_port()
        self.proxy_remoteurl = proxy_remoteurl
        self.proxy_username = proxy_username
        self.proxy_password = proxy_password
        #: An htpasswd file: the registry then wants HTTP Basic, not a token.
        self.htpasswd = htpasswd
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.proc: Optional[subprocess.Popen] = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def config(self) -> dict:
        config = {
            "version": 0.1,
            "log": {"level": self.log_level, "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "storage")}, "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        if self.htpasswd:
            config["auth"] = {"htpasswd": {"realm": "regcache-test", "path": str(self.htpasswd)}}
        if self.proxy_remoteurl:
            config["proxy"] = {"remoteurl": self.proxy_remoteurl}
            if self.proxy_username:
                config["proxy"].update(username=self.proxy_username, password=self.proxy_password)
        return config

    def start(self, tries: int = 5) -> "RealRegistry":
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "config.yml"
        # JSON is YAML, so no YAML library is needed.
        config_path.write_text(json.dumps(self.config(), indent=2))
        self.log_path = self.root / "registry.log"
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([BINARY, "serve", str(config_path)], stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/v2/", timeout=2).close()
                return self
            except urllib.error.HTTPError:
                return self  # any HTTP answer (e.g. a 401) means it is up
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    said = self.log_path.read_bytes()[logged:].decode("utf-8", "replace")
                    if self._picked and tries > 1 and "address already in use" in said:
                        self.port = free_port()
                        return self.start(tries - 1)
                    raise RuntimeError(f"docker-registry did not start: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self._log.close()
            self.proc = None

    def __enter__(self) -> "RealRegistry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def push_dir(self, source: Path, ref: str, *, all_images: bool = True) -> None:
        """
        ``skopeo copy dir:SOURCE docker://HOST/REF``.  ``--preserve-digests``
        matters: without it skopeo gzips uncompressed OCI layers on push and
        rewrites the manifest; ``--all`` keeps an index whole.
        """
        args = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
        if all_images:
            args.append("--all")
        subprocess.run(args + [f"dir:{source}", f"docker://{self.host}/{ref}"], check=True,
                       capture_output=True, timeout=300)

    def push_image(self, image, workdir: Optional[Path] = None) -> None:
        """Export ``image`` (tests.fakes.images.Image) to a ``dir:`` and push it under its own name."""
        from tests.fakes.images import export_dir

        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            self.push_dir(export_dir(image, Path(tmp) / "image"), image.name)

    def inspect_raw(self, ref: str) -> bytes:
        """The manifest bytes ``skopeo inspect --raw`` gets for ``HOST/REF``."""
        return subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{self.host}/{ref}"],
                              check=True, capture_output=True, timeout=60).stdout
