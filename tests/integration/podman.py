"""A private podman for integration tests: its own storage, one registries.conf.

``Podman(tmpdir, registries_conf)`` runs ``podman`` (Debian's 4.3) as
``/work/shared/CLIENTS.md`` describes: ``--root``, ``--runroot``,
``--tmpdir`` and ``--network-config-dir`` in a short ``/tmp/pdm*`` directory
(podman refuses a runroot longer than 50 characters), the ``vfs`` storage
driver (no mounts, nothing to clean up but files), ``cgroupfs``, a file
events backend, a private auth file in *tmpdir*, and ``--registries-conf``
naming the mirrors.  Nothing runs between commands: each is one process;
:meth:`Podman.close` (or leaving the ``with`` block) removes the storage.

podman tries the ``[[registry.mirror]]`` entries in order and then the
registry itself, silently (the Go proxy environment makes that last try fail
fast on a dead loopback port): a test must check the mirror served the pull.

Writes outside *tmpdir*: as root, ``/var/lib/containers/cache/
blob-info-cache-v1.boltdb`` (shared with skopeo; it only remembers where
blobs were seen).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from .harness import GO_PROXY_ENV, require_binary

__all__ = ["Podman", "PodmanError"]


class PodmanError(RuntimeError):
    """A podman command failed unexpectedly."""


class Podman:
    def __init__(self, tmpdir: Path, registries_conf: Path) -> None:
        require_binary("podman", "podman")
        self.tmpdir = tmpdir
        self.registries_conf = registries_conf
        tmpdir.mkdir(parents=True, exist_ok=True)
        auth_file = tmpdir / "auth.json"  # podman wants it to exist
        auth_file.write_text('{"auths": {}}\n')
        self.state_dir = Path(tempfile.mkdtemp(prefix="pdm", dir="/tmp"))
        self.env = {
            **os.environ,
            **GO_PROXY_ENV,
            "REGISTRY_AUTH_FILE": str(auth_file),
            "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
        }

    def argv(self, *args: str) -> list[str]:
        d = self.state_dir
        return [
            "podman",
            "--root", str(d / "root"),
            "--runroot", str(d / "run"),
            "--tmpdir", str(d / "tmp"),
            "--network-config-dir", str(d / "net"),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--registries-conf", str(self.registries_conf),
            *args,
        ]  # fmt: skip

    def run(
        self, *args: str, timeout: float = 120.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args),
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def pull(self, ref: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``podman pull REF`` (this machine's platform); does not raise,
        check ``returncode``."""
        return self.run("pull", ref, timeout=timeout)

    def inspect(self, ref: str) -> dict[str, Any]:
        """``podman image inspect REF``: ``Digest``, ``RepoDigests``, ``Id`` ..."""
        out = json.loads(self.run("image", "inspect", ref, timeout=30, check=True).stdout)
        if len(out) != 1:
            raise PodmanError(f"podman image inspect {ref}: expected one image, got {out!r}")
        image: dict[str, Any] = out[0]
        return image

    def close(self) -> None:
        """Delete every image and podman's state (vfs: plain files, no mounts)."""
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
