# test-case-name: tests.integration.test_status_proc
"""
The status page and the logs of a real regcache: pulls through twistd
regcache in front of the fake Hub, /status rendered by headless Chromium
with its key figures read back from the DOM and checked against
/status.json, screenshots at desktop and phone width kept as artifacts,
the JSON log lines checked against docs/logs.md, and no credential or
token anywhere in the logs, the metrics or the status page.
"""

import base64
import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from tests.integration.clients import skopeo_pull
from tests.integration.conftest import USERS
from tests.fakes.images import private
from tests.integration.procs import Regcache, wait_for
from tests.test_logs import check_lines
from tests.test_status import Page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("REGCACHE_ARTIFACTS", os.path.join(tempfile.gettempdir(), "regcache-artifacts")))
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json, "
                    "application/vnd.docker.distribution.manifest.v2+json"}


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``, with a profile of its own, sandboxless only as root."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    with tempfile.TemporaryDirectory(prefix="regcache-chromium-") as profile:
        cmd = [CHROMIUM, "--headless", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--no-first-run", "--disable-extensions", *args, url]
        if os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def screenshot(url: str, name: str, width: int, height: int) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    if path.exists():
        path.unlink()
    chromium(url, f"--screenshot={path}", f"--window-size={width},{height}")
    assert path.stat().st_size > 0
    print(f"status page screenshot: {path}")
    return path


def test_status_page_in_chromium_matches_status_json(regcache, hub, images):
    """
    After a cold and a warm pull of an image, Chromium's DOM of /status
    shows the figures /status.json gives (pulls, hit ratio, bytes saved,
    store, the most pulled image, the upstream's health), and the page is
    screenshot at desktop and phone width.
    """
    rc = regcache("--log-format", "json", "--max-size", "1Gi")
    image = images["library/small:1"]
    for _ in range(2):
        status, _, _ = rc.get("/v2/library/small/manifests/1", headers=ACCEPT)
        assert status == 200
        for layer in image.layers:
            status, _, body = rc.get(f"/v2/library/small/blobs/{layer.digest}")
            assert status == 200 and len(body) == layer.size
    layer_bytes = sum(layer.size for layer in image.layers)
    # A client has every byte of a blob a moment before its download lands
    # in the store: wait for the store to hold them.
    wait_for(lambda: json.loads(rc.get("/status.json")[2])["store"]["bytes"] >= layer_bytes, 30,
             "the downloads to land")
    status, headers, body = rc.get("/status.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["bytes"] == {"served": 2 * layer_bytes, "fetched": layer_bytes, "saved": layer_bytes}
    # A single --upstream that is not Docker Hub is named after its host.
    name = hub.registry_host
    assert data["top_images"] == [{"name": f"{name}/library/small", "pulls": 2}]
    assert data["cache"]["hits"] > 0 and data["cache"]["misses"] > 0
    assert data["store"]["limit"] == 1024 ** 3 and data["store"]["bytes"] >= layer_bytes
    assert [(u["upstream"], u["state"]) for u in data["upstreams"]] == [(name, "up")]

    dom = chromium(rc.url + "/status", "--dump-dom").stdout
    page = Page(dom)
    assert page.value("pulls-6h") == str(data["docker_hub"]["pulls_6h"])
    assert page.value("pulls-24h") == str(data["docker_hub"]["pulls_24h"])
    assert float(page.value("hit-ratio")) == pytest.approx(data["cache"]["hit_ratio"])
    assert page.value("bytes-saved") == str(data["bytes"]["saved"])
    assert page.value("store-bytes") == str(data["store"]["bytes"])
    assert page.value("store-limit") == str(data["store"]["limit"])
    images_shown = [a["data-value"] for t, a in page.tags if t == "td" and a.get("class") == "num image-pulls"]
    assert images_shown == [str(i["pulls"]) for i in data["top_images"]]
    assert f"{name}/library/small" in page.text
    assert [a["data-state"] for _, a in page.tags if a.get("class") == "member"] == ["up"]
    assert len([t for t, _ in page.tags if t == "rect"]) == 24

    screenshot(rc.url + "/status", "status-desktop.png", 1280, 900)
    screenshot(rc.url + "/status", "status-phone.png", 390, 844)
    requests = [line for line in check_lines(rc.log()) if line.get("event") == "request"]
    # The second pull of a layer is a hit, or joins the first one's fill if
    # that has sent every byte but not yet landed in the store.
    for layer in image.layers:
        results = [r["cache"] for r in requests if r["path"] == f"/v2/library/small/blobs/{layer.digest}"]
        assert results[0] == "miss" and results[1:] in (["hit"], ["join"]), results


def test_no_credential_or_token_is_ever_shown(regcache, hub, images, tmp_path):
    """
    With upstream credentials and tokens issued by the fake Hub (and a
    client that sends a secret of its own in a header and a query), no
    log line, metric, status page or error body holds the password, its
    Basic form, or a token; every log line is valid JSON of the documented
    shape.
    """
    rc = regcache("--log-format", "json")
    r = skopeo_pull(f"{rc.host}/ci/private:1", str(tmp_path / "pulled"))
    assert r.returncode == 0, r.stderr
    client_secret = "client-secret-0123456789"
    rc.get(f"/v2/library/small/manifests/1?access_token={client_secret}",
           headers=dict(ACCEPT, Authorization=f"Bearer {client_secret}"))
    assert hub.stats()["tokens_issued"] > 0
    password = USERS["ci"]
    secrets = [password, base64.b64encode(f"ci:{password}".encode()).decode(), client_secret]
    errors = {}
    for path in ("/v2/ci/private/manifests/nosuchtag", "/v2/ci/nosuchrepo/manifests/1", "/v2/Bad..Name/tags/list",
                 f"/v2/ci/private/blobs/sha256:{'0' * 64}", "/v2/ci/private/blobs/uploads/"):
        status, _, body = rc.get(path, headers=ACCEPT)
        assert status >= 400, path
        errors[f"error body of {path}"] = body.decode("utf-8")
    shown = {"log": rc.log(), **errors}
    for path in ("/metrics", "/status", "/status.json"):
        status, _, body = rc.get(path)
        assert status == 200, path
        shown[path] = body.decode("utf-8")
    lines = check_lines(shown["log"])
    # Tokens were used: every manifest request upstream after the first challenge carried one.
    assert any(line.get("event") == "upstream" and line["kind"] == "manifest" and line["status"] == 200
               for line in lines)
    for where, text in shown.items():
        for secret in secrets:
            assert secret not in text, f"{where} shows a credential"
        assert not re.search(r"(fake|refresh)-[0-9a-f]{32}", text), f"{where} shows a token"


def test_the_page_names_only_repositories_the_reader_may_pull(hub, images_dir, tmp_path):
    """
    robot, whose group the policy lets pull ci/**, pulls the private
    ci/private:1 and the public library/small:1; alice, logged in but not
    allowed ci/**, reads /status and /status.json and finds library/small
    there and no trace of ci/private, which robot's page still shows; nor
    does she see robot's download of a ci/private layer under way.
    """
    htpasswd = tmp_path / "htpasswd"
    for user, flag in (("robot", "-cbB"), ("alice", "-bB")):
        subprocess.run(["htpasswd", flag, str(htpasswd), user, f"{user}-pw"], check=True, capture_output=True)
    (tmp_path / "password").write_text(USERS["ci"] + "\n")
    config = tmp_path / "regcache.yaml"
    config.write_text(f"""\
upstreams:
  - name: dockerhub
    urls:
      - url: {hub.registry_url}
        username: ci
        password_file: {tmp_path / "password"}
auth:
  htpasswd: {htpasswd}
  groups:
    ci: [robot]
policy:
  dockerhub:
    default: deny
    rules:
      - allow: ci/**
        groups: [ci]
      - allow: library/*
""")
    robot, alice = ({"Authorization": "Basic " + base64.b64encode(f"{u}:{u}-pw".encode()).decode()}
                    for u in ("robot", "alice"))
    with Regcache(str(tmp_path / "store"), None, ["--config", str(config)]) as rc:
        for name in ("ci/private", "library/small"):
            status, _, body = rc.get(f"/v2/{name}/manifests/1", headers={**robot, **ACCEPT})
            assert status == 200, body
        assert rc.get("/v2/ci/private/manifests/1", headers={**alice, **ACCEPT})[0] == 403
        names = [i["name"] for i in json.loads(rc.get("/status.json", headers=robot)[2])["top_images"]]
        assert sorted(names) == ["dockerhub/ci/private", "dockerhub/library/small"]
        status, _, body = rc.get("/status.json", headers=alice)
        assert status == 200
        assert [i["name"] for i in json.loads(body)["top_images"]] == ["dockerhub/library/small"]
        assert b"ci/private" not in body
        status, _, page = rc.get("/status", headers=alice)
        assert status == 200
        assert b"library/small" in page and b"ci/private" not in page

        hub.fault("stall", scope="blobs", after=1024)
        layer = private(images_dir).layers[0].digest

        def follow():
            # The download stays stalled; the process stops under it.
            try:
                rc.get(f"/v2/ci/private/blobs/{layer}", headers=robot, timeout=30)
            except (OSError, http.client.HTTPException):
                pass

        threading.Thread(target=follow, daemon=True).start()
        shown = wait_for(lambda: json.loads(rc.get("/status.json", headers=robot)[2])["downloads"])
        assert [d["repository"] for d in shown] == ["ci/private"]
        status, _, body = rc.get("/status.json", headers=alice)
        assert (status, json.loads(body)["downloads"]) == (200, [])
        assert layer.encode() not in rc.get("/status", headers=alice)[2]
