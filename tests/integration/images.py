"""Test images built by hand, with no network.

Every image is written byte for byte here (tar layers via :mod:`tarfile`, config
JSON, manifests, indexes) in skopeo's ``dir:`` layout and pushed with ``skopeo
copy --preserve-digests``, so the digests we compute are the digests the
registry serves, for OCI and Docker media types alike.

The big layer is random (incompressible) data in a gzip stream written at
level 0 (stored blocks): the common ``tar+gzip`` media type, what a real gzip of
random data looks like on the wire, and ~5x faster to produce than level 1.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

#: every manifest type, for an Accept header
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)

KIND_TYPES = {
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP, OCI_INDEX),
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_LIST),
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass
class Image:
    """A pushed image (one manifest) or index (a list of manifests)."""

    name: str  #: short name as a user types it: "multilayer"
    repository: str  #: upstream repository: "library/multilayer"
    tag: str
    media_type: str
    manifest: bytes  #: the exact manifest bytes the registry serves
    config: Blob | None = None
    layers: list[Blob] = field(default_factory=list)
    #: for an index: "linux/amd64" -> the child image
    children: dict[str, Image] = field(default_factory=dict)
    #: the ``dir:`` layout it was pushed from (what a ``dir:`` pull must equal)
    layout: Path | None = None

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def reference(self) -> str:
        """``library/multilayer:1``"""
        return f"{self.repository}:{self.tag}"

    def docker_ref(self, host_port: str, *, by_digest: bool = False) -> str:
        """``docker://127.0.0.1:PORT/library/multilayer:1`` for skopeo."""
        suffix = f"@{self.manifest_digest}" if by_digest else f":{self.tag}"
        return f"docker://{host_port}/{self.repository}{suffix}"

    @property
    def blobs(self) -> dict[str, Blob]:
        """Every blob (configs and layers, children included), by digest."""
        out: dict[str, Blob] = {}
        if self.config is not None:
            out[self.config.digest] = self.config
        for layer in self.layers:
            out[layer.digest] = layer
        for child in self.children.values():
            out.update(child.blobs)
        return out

    @property
    def manifests(self) -> dict[str, bytes]:
        """This manifest and every child's, by digest."""
        out = {self.manifest_digest: self.manifest}
        for child in self.children.values():
            out.update(child.manifests)
        return out

    @property
    def biggest_layer(self) -> Blob:
        return max(self.blobs.values(), key=lambda b: b.size)

    def summary(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "media_type": self.media_type,
            "manifest_digest": self.manifest_digest,
            "blobs": {d: b.size for d, b in self.blobs.items()},
            "children": {p: c.manifest_digest for p, c in self.children.items()},
        }


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through to *out*."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)


class _RandomReader:
    """A file-like source of *size* random bytes (os.urandom is ~250 MB/s here)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        self.left -= n
        return os.urandom(n)


#: a layer's files: path -> bytes, or path -> (size, None) for random content
LayerFiles = dict[str, "bytes | int"]


class LayoutWriter:
    """Writes blobs and manifests as skopeo's ``dir:`` transport lays them out.

    ``dir:`` (not ``oci:``) because skopeo's OCI-layout source only accepts
    OCI media types in ``index.json``, and we want Docker manifests and
    manifest lists with exact bytes too: ``manifest.json`` is the top
    manifest, ``<hex>.manifest.json`` each child of an index, ``<hex>`` a blob.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "version").write_text("Directory Transport Version: 1.1\n")

    def _path(self, digest: str) -> Path:
        return self.dir / digest.split(":", 1)[1]

    def add_bytes(self, data: bytes, media_type: str) -> Blob:
        blob = Blob(sha256_digest(data), len(data), media_type)
        self._path(blob.digest).write_bytes(data)
        return blob

    def _json(self, obj: Any) -> bytes:
        return json.dumps(obj, indent=3).encode()  # indented like many real manifests

    def add_layer(
        self, files: LayerFiles, media_type: str, gzip_level: int = 6
    ) -> tuple[Blob, str]:
        """A gzip'd tar of *files*; returns (blob, diff_id). An int value is a
        file of that many random bytes, streamed to disk."""
        tmp = self.dir / "tmp-layer"
        with open(tmp, "wb") as f:
            compressed = _HashingWriter(f)
            with gzip.GzipFile(
                fileobj=compressed, mode="wb", compresslevel=gzip_level, mtime=0
            ) as gz:
                plain = _HashingWriter(gz)  # type: ignore[arg-type]
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                    for path, content in files.items():
                        info = tarfile.TarInfo(path)
                        info.mtime = 1_700_000_000
                        info.mode = 0o644
                        if isinstance(content, int):
                            info.size = content
                            tar.addfile(info, _RandomReader(content))  # type: ignore[arg-type]
                        else:
                            info.size = len(content)
                            tar.addfile(info, io.BytesIO(content))
        blob = Blob("sha256:" + compressed.hash.hexdigest(), compressed.size, media_type)
        tmp.rename(self._path(blob.digest))
        return blob, "sha256:" + plain.hash.hexdigest()

    def add_image(
        self,
        layers: Iterable[LayerFiles],
        kind: str = "oci",
        architecture: str = "amd64",
        variant: str | None = None,
        gzip_level: int = 6,
        name: str = "",
    ) -> Image:
        """Layers, config and manifest; the manifest is not written yet (see
        :meth:`finish`), since it may be a child of an index."""
        manifest_type, config_type, layer_type, _ = KIND_TYPES[kind]
        blobs, diff_ids = [], []
        for files in layers:
            blob, diff_id = self.add_layer(files, layer_type, gzip_level)
            blobs.append(blob)
            diff_ids.append(diff_id)
        config_obj: dict[str, Any] = {
            "created": "2024-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/true"], "Labels": {"test": name}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
                for i in range(len(diff_ids))
            ],
        }
        if variant:
            config_obj["variant"] = variant
        config = self.add_bytes(self._json(config_obj), config_type)
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config.descriptor(),
            "layers": [b.descriptor() for b in blobs],
        }
        return Image(name, "", "", manifest_type, self._json(manifest), config, blobs)

    def add_index(self, children: dict[str, Image], kind: str = "oci", name: str = "") -> Image:
        index_type = KIND_TYPES[kind][3]
        entries = []
        for platform, child in children.items():
            os_, arch, *variant = platform.split("/")
            plat = {"architecture": arch, "os": os_, **({"variant": variant[0]} if variant else {})}
            entries.append(
                {
                    "mediaType": child.media_type,
                    "digest": child.manifest_digest,
                    "size": len(child.manifest),
                    "platform": plat,
                }
            )
        index = {"schemaVersion": 2, "mediaType": index_type, "manifests": entries}
        return Image(name, "", "", index_type, self._json(index), children=children)

    def finish(self, image: Image) -> None:
        """Write *image* as the top manifest (and its children's manifests)."""
        (self.dir / "manifest.json").write_bytes(image.manifest)
        for child in image.children.values():
            (self.dir / f"{child.manifest_digest.split(':', 1)[1]}.manifest.json").write_bytes(
                child.manifest
            )


def small_files(rng: random.Random, count: int, size: int, prefix: str) -> LayerFiles:
    """*count* files of *size* pseudo-random bytes (mildly compressible text)."""
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789 \n"
    return {f"{prefix}/file{i}.txt": bytes(rng.choices(alphabet, k=size)) for i in range(count)}


@dataclass
class ImageSpec:
    """How to build one test image; see :func:`build_test_images`."""

    name: str
    repository: str
    tag: str
    build: Callable[[LayoutWriter, random.Random], Image]


BIG_LAYER_BYTES = 110 * 1024 * 1024
MEDIUM_LAYER_BYTES = 8 * 1024 * 1024


def _multilayer(w: LayoutWriter, rng: random.Random) -> Image:
    layers: list[LayerFiles] = [
        small_files(rng, 20, 2000, "etc"),
        {"usr/lib/medium.bin": MEDIUM_LAYER_BYTES},  # in flight long enough to race on
        small_files(rng, 5, 50_000, "usr/share"),
        {"app/hello.txt": b"hello from regproxy tests\n"},
    ]
    return w.add_image(layers, "oci", name="multilayer")


def _dockerimg(w: LayoutWriter, rng: random.Random) -> Image:
    layers: list[LayerFiles] = [
        small_files(rng, 10, 3000, "bin"),
        {"srv/data.bin": 2 * 1024 * 1024},
    ]
    return w.add_image(layers, "docker", name="dockerimg")


def _multiarch(kind: str) -> Callable[[LayoutWriter, random.Random], Image]:
    def build(w: LayoutWriter, rng: random.Random) -> Image:
        shared = small_files(random.Random(kind), 8, 4000, "shared")  # same layer in every platform
        children = {}
        for platform in ("linux/amd64", "linux/arm64/v8", "linux/arm/v7"):
            _, arch, *variant = platform.split("/")
            own = small_files(rng, 6, 5000, arch)
            children[platform] = w.add_image(
                [shared, own],
                kind,
                architecture=arch,
                variant=variant[0] if variant else None,
                name=f"multiarch-{kind}",
            )
        return w.add_index(children, kind, name=f"multiarch-{kind}")

    return build


def _big(w: LayoutWriter, rng: random.Random) -> Image:
    layers: list[LayerFiles] = [small_files(rng, 4, 1000, "etc"), {"data/big.bin": BIG_LAYER_BYTES}]
    return w.add_image(layers, "oci", gzip_level=0, name="big")


def _private(w: LayoutWriter, rng: random.Random) -> Image:
    return w.add_image([small_files(rng, 3, 1000, "secret")], "oci", name="secret")


IMAGE_SPECS = [
    #: OCI manifest, 4 layers (one of 8 MB)
    ImageSpec("multilayer", "library/multilayer", "1", _multilayer),
    #: Docker schema 2 manifest, 2 layers
    ImageSpec("dockerimg", "library/dockerimg", "1", _dockerimg),
    #: OCI index: linux/amd64, linux/arm64/v8, linux/arm/v7 (one shared layer)
    ImageSpec("multiarch", "library/multiarch", "1", _multiarch("oci")),
    #: Docker manifest list, same platforms
    ImageSpec("dockerlist", "library/dockerlist", "1", _multiarch("docker")),
    #: OCI manifest with a 110 MiB incompressible layer
    ImageSpec("big", "library/big", "1", _big),
    #: private repository: anonymous tokens carry no actions
    ImageSpec("private", "private/secret", "1", _private),
]


def build_layout(spec: ImageSpec, directory: Path, seed: int = 0) -> Image:
    w = LayoutWriter(directory)
    image = spec.build(w, random.Random(f"{spec.name}-{seed}"))
    image.name, image.repository, image.tag = spec.name, spec.repository, spec.tag
    for child in image.children.values():
        child.repository, child.tag = spec.repository, spec.tag
    w.finish(image)
    image.layout = directory
    return image
