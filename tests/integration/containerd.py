"""A private, throw-away containerd and its ``ctr`` client for integration tests.

``Containerd(tmpdir)`` starts ``containerd --config F`` (Debian's
``containerd`` 1.6, installed with ``docker.io``) the way
``/work/shared/CLIENTS.md`` describes: its own root, state, opt directory and
gRPC socket, the CRI plugin disabled.  :meth:`Containerd.pull` runs ``ctr -a
SOCK -n NAMESPACE images pull --hosts-dir D REF``, where ``D/<registry>/
hosts.toml`` (or ``D/_default/hosts.toml``) names the mirror.

What ctr 1.6 sends to a mirror (a ``[host."http://..."]`` that is not the
registry's own ``server``): every request carries ``?ns=<registry>`` (the
registry host of REF, ``docker.io`` for Docker Hub); ``HEAD
/v2/NAME/manifests/TAG`` with one ``Accept`` list, then ``GET`` by digest for
the index, the platform's manifest, the config and layers.  With
``override_path = true`` the host URL's path replaces ``/v2``:
``[host."http://P/v2/ghcr.io"]`` asks ``/v2/ghcr.io/NAME/manifests/TAG?ns=ghcr.io``.

ctr (not containerd) does the HTTP, so it gets the Go proxy environment: a
fallback from the mirror to the real ``server`` dies on a dead loopback port
instead of leaving the machine.  ctr tries the hosts in order and then the
``server``, silently: a test must still check that the mirror served the pull.
ctr also ignores a ``--hosts-dir`` that does not exist, and then talks to the
registry itself: :meth:`Containerd.pull` refuses such a directory.

The daemon's state lives in a short ``/tmp/ctd*`` directory (unix socket paths
are limited to ~108 bytes), removed by :meth:`Containerd.stop`; the config and
log stay in ``tmpdir`` for a post-mortem.  Nothing is written outside these.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from .dockerd import DockerDaemon
from .harness import GO_PROXY_ENV, _terminate, require_binary, tail, wait_until

__all__ = ["Containerd", "ContainerdError", "install_hosts_dir"]

#: the placeholder for regproxy's address in the shipped ``etc/`` examples
EXAMPLE_HOST_PORT = "127.0.0.1:5000"


class ContainerdError(RuntimeError):
    """containerd did not start, or a ctr command failed unexpectedly."""


class Containerd:
    """A private containerd; use as a context manager or call start/stop."""

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        *,
        namespace: str = "test",
        start_timeout: float = 20.0,
        stop_timeout: float = 10.0,
    ) -> None:
        require_binary("containerd", "containerd")
        require_binary("ctr", "containerd")
        self.tmpdir = Path(tmpdir)
        self.namespace = namespace
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.config_path = self.tmpdir / "containerd.toml"
        self.log_path = self.tmpdir / "containerd.log"
        self.state_dir: Path | None = None
        self.socket_path: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        assert self.state_dir is not None and self.socket_path is not None
        d = self.state_dir
        return (
            "version = 2\n"
            f'root = "{d}/root"\n'
            f'state = "{d}/state"\n'
            # No Kubernetes here, and CRI would want CNI and more.
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket_path}"\n'
            # Else containerd creates /opt/containerd.
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{d}/opt"\n'
        )

    def start(self) -> Containerd:
        if self.process is not None:
            raise ContainerdError("containerd is already started")
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = Path(tempfile.mkdtemp(prefix="ctd", dir="/tmp"))
        self.socket_path = self.state_dir / "c.sock"
        self.config_path.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **GO_PROXY_ENV},
                cwd=self.state_dir,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        def up() -> bool:
            assert self.process is not None and self.socket_path is not None
            if self.process.poll() is not None:
                raise ContainerdError(
                    f"containerd exited with status {self.process.returncode} while starting; "
                    f"see {self.log_path}:\n{tail(self.log_path)}"
                )
            return self.socket_path.exists() and self.ctr("version", timeout=10).returncode == 0

        try:
            wait_until(up, self.start_timeout, f"containerd on {self.socket_path}", 0.05)
        except TimeoutError as e:
            raise ContainerdError(f"{e}; see {self.log_path}:\n{tail(self.log_path)}") from None

    def stop(self) -> None:
        """SIGTERM containerd (SIGKILL after ``stop_timeout``); remove its state."""
        proc, self.process = self.process, None
        if proc is not None:
            _terminate(proc, timeout=self.stop_timeout)
        if self.state_dir is not None:
            DockerDaemon._unmount_below(self.state_dir)  # unpacking mounts snapshots
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- ctr -----------------------------------------------------------------

    def ctr(
        self, *args: str, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCK -n NAMESPACE ARGS...``, output captured."""
        if self.socket_path is None:
            raise ContainerdError("containerd is not started")
        argv = ["ctr", "-a", str(self.socket_path), "-n", self.namespace, *args]
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**os.environ, **GO_PROXY_ENV},
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ContainerdError(
                f"{' '.join(argv)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def pull(
        self, ref: str, hosts_dir: Path, *, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --hosts-dir HOSTS_DIR REF`` (this machine's
        platform, unpacked); does not raise, check ``returncode``."""
        if not hosts_dir.is_dir():
            # ctr would ignore it and go to the registry itself.
            raise ContainerdError(f"hosts dir {hosts_dir} does not exist")
        return self.ctr("images", "pull", "--hosts-dir", str(hosts_dir), ref, timeout=timeout)

    def images(self) -> dict[str, str]:
        """``ctr images ls``: reference -> the manifest (or index) digest."""
        out = self.ctr("images", "ls", timeout=30, check=True).stdout.splitlines()
        # REF TYPE DIGEST SIZE PLATFORMS LABELS
        return {line.split()[0]: line.split()[2] for line in out[1:] if line.strip()}

    def content(self) -> set[str]:
        """Digests of every blob in this namespace's content store."""
        out = self.ctr("content", "ls", "-q", timeout=30, check=True).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}


def install_hosts_dir(
    examples: Path, dest: Path, proxy_host_port: str, registries: Iterable[str]
) -> Path:
    """Copy ``examples/<registry>/hosts.toml`` (the shipped
    ``etc/containerd/...``) for each of *registries* into *dest*, with the
    example's ``127.0.0.1:5000`` replaced by *proxy_host_port*; returns *dest*
    for ``--hosts-dir``."""
    for registry in registries:
        example = examples / registry / "hosts.toml"
        text = example.read_text()
        if EXAMPLE_HOST_PORT not in text:
            raise ValueError(f"{example} does not name {EXAMPLE_HOST_PORT}")
        target = dest / registry / "hosts.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.replace(EXAMPLE_HOST_PORT, proxy_host_port))
    return dest
