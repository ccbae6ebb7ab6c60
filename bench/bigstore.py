"""
A synthetic store of about a million cached blobs, written straight to disk
in regcache's layout (regcache/store.py), for the ``bigstore`` phase.

Each image is what a pull leaves behind: an OCI manifest (its body under
``blobs/``, its type record under ``manifests/``) naming two tiny layers (the
first one doubles as the config, as in tests/integration/synthetic.py), and
a links file for each of the three (``links/``, one repository each: the
file a served blob gets).  Every digest is correct, so the store is one
regcache would accept from a pull.  Files get ascending mtimes, image by
image, which regcache's index reads as last use: an eviction takes the
oldest images first.

Writing 1,000,000 blobs (2.3 million files) takes a minute or so: the
images are split between one worker process per core, each writing with
plain ``os.open``/``os.write`` into directories made up front.  A store is
reused across runs (a marker file records what it holds); ``repair`` puts
back the images an eviction pass deleted, so the next run starts from the
same store.
"""

import hashlib
import json
import multiprocessing
import os
import time
from typing import Tuple

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MARKER = ".bench-bigstore"
LAYER_BYTES = 64
#: The repository (upstream name, name) every file is linked to.
LINK = b"bench library/bigstore\n"
FIRST_MTIME = 1_000_000_000.0


def _image(i: int) -> Tuple[Tuple[str, bytes], ...]:
    """(hex digest, bytes) of image ``i``'s two layers and its manifest."""
    layers = []
    for j in range(2):
        data = hashlib.shake_256(f"bigstore/{i}/{j}".encode()).digest(LAYER_BYTES)
        layers.append((hashlib.sha256(data).hexdigest(), data))
    body = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + layers[0][0], "size": LAYER_BYTES},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + h,
                    "size": LAYER_BYTES} for h, _ in layers],
    }).encode()
    return (*layers, (hashlib.sha256(body).hexdigest(), body))


def _put(path: str, data: bytes, mtime: float) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)


def _write(root: str, i: int) -> None:
    mtime = FIRST_MTIME + i
    files = _image(i)
    for hex_, data in files:
        _put(os.path.join(root, "blobs", "sha256", hex_[:2], hex_), data, mtime)
        _put(os.path.join(root, "links", "sha256", hex_[:2], hex_), LINK, mtime)
    hex_ = files[-1][0]
    _put(os.path.join(root, "manifests", "sha256", hex_[:2], hex_), OCI_MANIFEST.encode(), mtime)


def _missing(root: str, i: int) -> bool:
    return any(not os.path.exists(os.path.join(root, "blobs", "sha256", h[:2], h)) for h, _ in _image(i))


def _work(args) -> int:
    """Write (or, repairing, rewrite where missing) every ``step``-th image from ``first``; returns how many."""
    root, first, step, images, repair = args
    n = 0
    for i in range(first, images, step):
        if not repair or _missing(root, i):
            _write(root, i)
            n += 1
    return n


def images_for(blobs: int) -> int:
    return (blobs + 2) // 3


def _pool_run(root: str, images: int, repair: bool) -> int:
    procs = os.cpu_count() or 1
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        return sum(pool.map(_work, [(root, k, procs, images, repair) for k in range(procs)]))


def make(root: str, blobs: int) -> dict:
    """
    A store of ``blobs`` blobs (rounded up to whole images) at ``root``:
    made if absent, repaired if an earlier run evicted from it.  Returns
    what it did and how long that took.
    """
    images = images_for(blobs)
    marker = os.path.join(root, MARKER)
    want = f"{images} {LAYER_BYTES}\n"
    t = time.monotonic()
    try:
        with open(marker) as f:
            have = f.read()
    except FileNotFoundError:
        have = None
    if have == want:
        written = _pool_run(root, images, repair=True)
        return {"made": False, "images_rewritten": written, "seconds": time.monotonic() - t}
    if have is not None:
        raise RuntimeError(f"{root} holds another synthetic store ({have.strip()}); remove it first")
    for kind in ("blobs", "links", "manifests"):
        for p in range(256):
            os.makedirs(os.path.join(root, kind, "sha256", f"{p:02x}"), exist_ok=True)
    written = _pool_run(root, images, repair=False)
    with open(marker, "w") as f:
        f.write(want)
    return {"made": True, "images_rewritten": written, "seconds": time.monotonic() - t}


def store_bytes(blobs: int) -> int:
    """Bytes regcache's index counts for the store (files under blobs/)."""
    # Every image's files have the same lengths: the digests in a manifest are all 64 hex digits.
    return images_for(blobs) * sum(len(data) for _, data in _image(0))
