"""
The chart's in-chart SeaweedFS, run for real: the `weed mini` command line
the StatefulSet renders, with the S3 identities from the chart's Secret,
answers regcache's own object-store client signing with the keys and
bucket the chart gives regcache's pods.  Only what a pod cannot have here
is changed: the data directory, the file paths, and loopback ports.
"""

import base64
import json
import os
import subprocess
import sys

import botocore.session

from tests.integration.procs import REPO, wait_for
from tests.integration.seaweed import Seaweed, weed_binary
from tests.test_chart import RELEASE, SEAWEEDFS, env, only, pod_spec, render

#: The flags that name the pod's paths and its one listening address.
POD_ONLY = ("-dir=", "-s3.config=", "-ip.bind=", "-s3.port=")


class ChartSeaweed(Seaweed):
    """``weed mini`` with the chart's arguments and identities."""

    def __init__(self, root, argv, identities):
        super().__init__(root)
        self.chart_args = [a for a in argv[1:] if not a.startswith(POD_ONLY)]
        with open(self.identities, "w") as f:
            f.write(identities)

    def args(self):
        ports = [f"-{name}={port}" for name, port in self._ports.items()]
        return [weed_binary(), *self.chart_args, f"-dir={os.path.join(self.root, 'data')}",
                f"-s3.config={self.identities}", "-ip.bind=127.0.0.1", f"-s3.port={self.s3_port}", *ports]


def test_the_rendered_seaweedfs_serves_regcache_with_the_charts_keys(tmp_path, monkeypatch):
    """
    The rendered weed command starts, creates the bucket regcache is told
    to use before anyone asks for it, and admits the access key regcache's
    pods get (put, create-only races, multipart, ranges, presigned GETs)
    while refusing a wrong secret; it writes no log files to the pod's
    small /tmp.
    """
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    objects, _ = render(SEAWEEDFS)
    sts = only(objects, "StatefulSet", f"{RELEASE}-seaweedfs")
    (ctr,) = sts["spec"]["template"]["spec"]["containers"]
    secret = only(objects, "Secret", f"{RELEASE}-s3")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    (identities,) = [v["secret"] for v in sts["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    (secret_key,) = [v["secret"] for v in pod_spec(objects)["volumes"] if v["name"] == "s3-credentials"]
    access = env(objects)["REGCACHE_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert access["name"] == identities["secretName"] == secret_key["secretName"] == secret["metadata"]["name"]
    bucket = env(objects)["REGCACHE_S3_BUCKET"]["value"]
    identities_json = data[identities["items"][0]["key"]]
    keys = data[access["key"]], data[secret_key["items"][0]["key"]]
    with ChartSeaweed(str(tmp_path / "weed"), ctr["command"] + ctr["args"], identities_json) as store:
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=store.endpoint, aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
            region_name="us-east-1")
        # weed makes the bucket a moment after its S3 port answers.
        wait_for(lambda: bucket in [b["Name"] for b in client.list_buckets()["Buckets"]], 30,
                 f"weed to create bucket {bucket}")
        run_env = dict(os.environ, PYTHONPATH=REPO)
        done = subprocess.run([sys.executable, "-m", "tests.integration.s3_exercise", store.endpoint, bucket,
                               *keys, str(tmp_path)],
                              cwd=REPO, env=run_env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert not [f.name for f in tmp.iterdir() if ".log." in f.name]
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert out["put"] and out["read"] == "hello"
    assert out["race_winners"] == 1
    assert out["multipart"] is True
    assert out["presigned"] == "hello"
    assert out["wrong_secret"] == 403
