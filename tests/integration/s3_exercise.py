"""
Drives regcache.s3 against a real object store from a process of its own
(pytest holds no reactor), and prints what each call gave as one JSON
object for tests/integration/test_s3_proc.py to check.

    python3 -m tests.integration.s3_exercise ENDPOINT BUCKET ACCESS SECRET WORKDIR
"""

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread

from regcache import upstream_http
from regcache.s3 import S3, BucketSettings, StorageError

#: S3's smallest part: three of them make a multipart upload here.
PART_SIZE = 5 * 1024 * 1024


async def exercise(reactor, endpoint, bucket, access, secret, workdir):
    out = {}
    http = upstream_http.client(reactor, 5.0)
    s3 = S3(BucketSettings(endpoint, bucket, access, secret, prefix="t/"), http, reactor, deferToThread,
             part_size=PART_SIZE)
    await s3.create_bucket()
    out["head_missing"] = await s3.head("missing") is None
    out["put"] = await s3.put("small", b"hello", content_type="text/plain", metadata={"media-type": "x/y"})
    info = await s3.head("small")
    out["head"] = [info.size, info.metadata]
    got = await s3.read("small")
    out["read"] = got[1].decode()
    out["create_only_taken"] = await s3.put("small", b"other", create_only=True)
    out["still"] = (await s3.read("small"))[1].decode()
    races = await defer.gatherResults([defer.Deferred.fromCoroutine(s3.put("race", b"%d" % i, create_only=True))
                                       for i in range(8)])
    out["race_winners"] = sum(races)
    big = os.urandom(2 * PART_SIZE + 4096)
    path = os.path.join(workdir, "big")
    with open(path, "wb") as f:
        f.write(big)
    digest = hashlib.sha256(big).hexdigest()
    out["multipart"] = await s3.upload("big", path, len(big), digest, "application/octet-stream",
                                       {"digest": digest})
    out["multipart_again"] = await s3.upload("big", path, len(big), digest, "application/octet-stream")
    info, response = await s3.open("big", start=PART_SIZE)
    import treq
    tail = await treq.content(response)
    out["range"] = [info.size, info.metadata.get("digest") == digest, tail == big[PART_SIZE:]]
    listed, _ = await s3.list("")
    out["listed"] = sorted(entry.key for entry in listed)
    url = s3.presign("small", 60)
    out["presigned"] = (await deferToThread(lambda: urllib.request.urlopen(url, timeout=10).read())).decode()

    def unsigned():
        try:
            urllib.request.urlopen(s3.url(s3.key("small")), timeout=10)
        except urllib.error.HTTPError as e:
            return e.code
        return 200
    out["unsigned"] = await deferToThread(unsigned)
    out["delete"] = await s3.delete("small")
    out["deleted"] = await s3.head("small") is None
    wrong = S3(BucketSettings(endpoint, bucket, access, "wrong-secret"), http, reactor, deferToThread)
    try:
        await wrong.head("race")
        out["wrong_secret"] = "answered"
    except StorageError as e:
        out["wrong_secret"] = e.status
    print(json.dumps(out))


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(exercise(reactor, *sys.argv[1:6])))
