"""
regcache's object-store client against a real SeaweedFS: what the shared
level rests on (create-only writes, multipart uploads, ranges, presigned
URLs, signatures) as the store really answers it.
"""

import json
import os
import subprocess
import sys

from tests.integration.procs import REPO
from tests.integration.seaweed import ACCESS_KEY, SECRET_KEY


def test_the_client_against_seaweedfs(seaweed, tmp_path):
    """Every call the shared level makes, with the answers a bucket gives."""
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-m", "tests.integration.s3_exercise", seaweed.endpoint, seaweed.bucket,
                           ACCESS_KEY, SECRET_KEY, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert out["head_missing"] and out["put"]
    assert out["head"] == [5, {"media-type": "x/y"}]
    assert out["read"] == "hello"
    # Create-only: the second writer is refused, and the first one's bytes stay.
    assert (out["create_only_taken"], out["still"]) == (False, "hello")
    assert out["race_winners"] == 1
    assert (out["multipart"], out["multipart_again"]) == (True, False)
    assert out["range"] == [2 * 5 * 1024 * 1024 + 4096, True, True]
    assert out["listed"] == ["big", "race", "small"]
    assert out["presigned"] == "hello"
    assert out["unsigned"] == 403
    assert out["delete"] and out["deleted"]
    assert out["wrong_secret"] == 403
