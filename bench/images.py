"""
The bench's test images, generated deterministically as OCI image layouts.

Every run builds byte-identical images, so digests are stable across runs and
machines, and a layout already on disk is reused.  Layer contents are an
AES-CTR keystream: incompressible (like the real layers that make a mirror
work hard) and produced at several GB/s, so the 512 MiB layer costs about a
second to build.  Each layer is a real gzip'd tar (stored blocks, level 0),
so its config's diff_id is right and a client could unpack it.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MiB = 1024 * 1024
VERSION = "3"  # bump when the images' bytes change, so cached layouts are rebuilt

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class Image:
    """One image as the bench pulls it: repository, tag, and what to expect."""

    name: str  # repository, e.g. library/small
    tag: str
    layout: str  # OCI layout directory
    ref: str  # its ref name inside the layout
    digest: str  # the top manifest (or index) digest
    media_type: str
    layers: List[dict] = field(default_factory=list)  # the biggest-first layer descriptors
    children: Dict[str, str] = field(default_factory=dict)  # platform -> child manifest digest

    @property
    def is_index(self) -> bool:
        return self.media_type == OCI_INDEX

    @property
    def size(self) -> int:
        return sum(layer["size"] for layer in self.layers)


class _Keystream:
    """Deterministic incompressible bytes: AES-256-CTR over zeros."""

    def __init__(self, seed: str):
        key = hashlib.sha256(("regcache-bench/" + seed).encode()).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()

    def read(self, n: int) -> bytes:
        return self._enc.update(bytes(n))


class _Hashing(io.RawIOBase):
    """A write-only file that hashes (and optionally stores) what passes through."""

    def __init__(self, out=None):
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        if self.out is not None:
            self.out.write(b)
        return len(b)


class _Layout:
    """Writes blobs into an OCI image layout directory."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        self.refs: List[dict] = []

    def put(self, data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.root, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    def layer(self, seed: str, size: int) -> tuple:
        """A tar.gz layer holding one file of ``size`` keystream bytes: (descriptor, diff_id)."""
        tmp = os.path.join(self.root, "blobs", "sha256", "tmp-" + seed)
        stream = _Keystream(seed)
        with open(tmp, "wb") as raw:
            compressed = _Hashing(raw)
            with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=0, mtime=0, filename="") as gz:
                plain = _Hashing(gz)
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                    info = tarfile.TarInfo(f"data/{seed}.bin")
                    info.size = size
                    info.mtime = 0
                    info.mode = 0o644
                    tar.addfile(info, _Reader(stream, size))
        digest = compressed.sha.hexdigest()
        os.replace(tmp, os.path.join(self.root, "blobs", "sha256", digest))
        return ({"mediaType": OCI_LAYER, "digest": "sha256:" + digest, "size": compressed.size},
                "sha256:" + plain.sha.hexdigest())

    def manifest(self, seed: str, layer_sizes: List[int], arch: str = "amd64") -> dict:
        layers, diff_ids = [], []
        for i, size in enumerate(layer_sizes):
            desc, diff_id = self.layer(f"{seed}-{i}", size)
            layers.append(desc)
            diff_ids.append(diff_id)
        config = _canonical({
            "architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Labels": {"bench": seed}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        manifest = _canonical({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": self.put(config, OCI_CONFIG), "layers": layers,
        })
        return dict(self.put(manifest, OCI_MANIFEST), layers=layers)

    def tag(self, desc: dict, ref: str) -> None:
        d = {k: desc[k] for k in ("mediaType", "digest", "size")}
        d["annotations"] = {"org.opencontainers.image.ref.name": ref}
        self.refs.append(d)
        with open(os.path.join(self.root, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": self.refs}, f)


class _Reader:
    """A file-like view of the first ``size`` bytes of a keystream, for tarfile."""

    def __init__(self, stream: _Keystream, size: int):
        self.stream = stream
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.stream.read(n)


def _canonical(doc) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def build(root: str, large_mib: int = 512) -> Dict[str, Image]:
    """
    Build (or reuse) the images under ``root``: small (1 MiB), medium
    (6 layers, 60 MiB), large (one ``large_mib`` layer), crowd (one 64 MiB
    layer, for the 1,000-client phase), cold (20 distinct 1 MiB layers, for
    the cold phase's time to first byte) and multi (an index of amd64 and
    arm64).  Returns them by short name.
    """
    root = os.path.join(root, f"images-v{VERSION}-{large_mib}")
    done = os.path.join(root, "images.json")
    if os.path.exists(done):
        with open(done) as f:
            return {k: Image(**v) for k, v in json.load(f).items()}
    shutil.rmtree(root, ignore_errors=True)
    layout = _Layout(os.path.join(root, "oci"))
    images = {}
    for short, sizes in (("small", [1 * MiB]), ("medium", [10 * MiB] * 6), ("large", [large_mib * MiB]),
                         ("crowd", [64 * MiB]), ("cold", [1 * MiB] * 20)):
        m = layout.manifest(short, sizes)
        layout.tag(m, short)
        layers = sorted(m["layers"], key=lambda x: -x["size"])
        images[short] = Image(f"library/{short}", "1", layout.root, short, m["digest"], OCI_MANIFEST, layers)
    children, all_layers = [], []
    for arch in ("amd64", "arm64"):
        m = layout.manifest(f"multi-{arch}", [2 * MiB], arch)
        all_layers += m["layers"]
        children.append(dict({k: m[k] for k in ("mediaType", "digest", "size")},
                             platform={"architecture": arch, "os": "linux"}))
    index = layout.put(_canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}), OCI_INDEX)
    layout.tag(index, "multi")
    images["multi"] = Image("library/multi", "1", layout.root, "multi", index["digest"], OCI_INDEX,
                            all_layers, {c["platform"]["architecture"]: c["digest"] for c in children})
    with open(done, "w") as f:
        json.dump({k: vars(v) for k, v in images.items()}, f, indent=1)
    return images


if __name__ == "__main__":
    import sys
    import time

    t = time.monotonic()
    for name, image in build(sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/regcache-bench").items():
        print(f"{name:7} {image.digest} {image.size / MiB:.1f} MiB")
    print(f"{time.monotonic() - t:.1f}s")
