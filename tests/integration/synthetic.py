"""
A large store made on disk directly, in regcache's layout, for start-up and
eviction tests that need thousands of entries without pulling them.

Each synthetic image is one OCI manifest (body and type record) naming two
small layers, all with correct digests, so ``regcache verify`` passes on it
and the start-up index sees a real reference graph.  Files get ascending
mtimes (older images first), which the index reads as last use.

``python -m tests.integration.synthetic DIR N`` writes about N blobs.
"""

import hashlib
import json
import os
import sys
from typing import Dict, List

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _put(root: str, kind: str, hex_: str, data: bytes, mtime: float) -> str:
    path = os.path.join(root, kind, "sha256", hex_[:2], hex_)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, (mtime, mtime))
    return path


def write_store(root: str, images: int, layer_size: int = 4096, first_mtime: float = 1_000_000_000.0,
                seed: str = "synthetic") -> Dict[str, List[str]]:
    """
    Write ``images`` images (3 blobs each: a manifest and two layers) under
    ``root``; returns {manifest digest: [layer digests]}.
    """
    out = {}
    for i in range(images):
        mtime = first_mtime + i
        layers = []
        for j in range(2):
            data = hashlib.shake_256(f"{seed}/{i}/{j}".encode()).digest(layer_size)
            hex_ = hashlib.sha256(data).hexdigest()
            _put(root, "blobs", hex_, data, mtime)
            layers.append(("sha256:" + hex_, len(data)))
        body = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": layers[0][0], "size": layers[0][1]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n}
                       for d, n in layers],
        }).encode()
        hex_ = hashlib.sha256(body).hexdigest()
        _put(root, "blobs", hex_, body, mtime)
        _put(root, "manifests", hex_, OCI_MANIFEST.encode(), mtime)
        out["sha256:" + hex_] = [d for d, _ in layers]
    return out


def count_files(root: str, kind: str = "blobs") -> int:
    n = 0
    for dirpath, _, names in os.walk(os.path.join(root, kind)):
        n += len(names)
    return n


def store_bytes(root: str) -> int:
    """Bytes of every file under blobs/ and tmp/: what the limit bounds."""
    total = 0
    for kind in ("blobs", "tmp"):
        for dirpath, _, names in os.walk(os.path.join(root, kind)):
            for name in names:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def dangling(root: str) -> List[str]:
    """
    Manifests (with a type record) that name a blob the store lacks.  Only
    meaningful for a store whose manifests all had their blobs at first.
    """
    bad = []
    for dirpath, _, names in os.walk(os.path.join(root, "manifests")):
        for hex_ in names:
            body_path = os.path.join(root, "blobs", "sha256", hex_[:2], hex_)
            try:
                with open(body_path, "rb") as f:
                    doc = json.load(f)
            except (FileNotFoundError, ValueError):
                continue
            for desc in [doc.get("config")] + doc.get("layers", []) + doc.get("manifests", []):
                if not desc:
                    continue
                ref = desc["digest"].split(":", 1)[1]
                if not os.path.exists(os.path.join(root, "blobs", "sha256", ref[:2], ref)):
                    bad.append(f"sha256:{hex_} -> {desc['digest']}")
    return bad


if __name__ == "__main__":
    root, n = sys.argv[1], int(sys.argv[2])
    write_store(root, (n + 2) // 3)
    print(f"{count_files(root)} blobs in {root}")
