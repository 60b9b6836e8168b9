"""A private, throw-away dockerd for integration tests.

``DockerDaemon(tmpdir, mirror_url)`` starts ``dockerd`` (the Debian
``docker.io`` package, 20.10) the way ``/work/shared/CLIENTS.md`` describes:
its own ``daemon.json`` with the ``vfs`` storage driver, no iptables, no
bridge, its own unix socket, data-root, exec-root, pidfile and key file, and
``registry-mirrors: [mirror_url]``.  Mirrors apply to ``docker.io`` only, so
``daemon.pull("hello:1")`` asks the mirror for ``library/hello``.

dockerd silently falls back to Docker Hub when the mirror fails; the daemon
runs with ``HTTP(S)_PROXY`` pointing at a dead loopback port so that a
fallback fails fast instead of leaving the machine, but a test must still
check that the mirror really served the pull (its access log or cache);
:meth:`DockerDaemon.fell_back` and :meth:`DockerDaemon.pull_log` read
dockerd's debug log for that.

What dockerd 20.10 sends to a mirror, seen on the wire (every request has
``Connection: close`` and ``User-Agent: docker/20.10.24+dfsg1 ...
UpstreamClient(Docker-Client/...)``):

- ``GET /v2/`` (``Accept-Encoding: gzip``); a Bearer 401 is followed;
- ``HEAD /v2/library/NAME/manifests/TAG`` with six ``Accept:`` lines, in a
  different order each time (docker v1 prettyjws, ``application/json``, OCI
  manifest, docker v2 manifest, docker manifest list, OCI index); without a
  ``Docker-Content-Digest`` in the answer it then GETs the tag as well;
- ``GET .../manifests/sha256:...`` (same Accept lines) for the index, then
  for this machine's manifest;
- ``GET .../blobs/sha256:...`` for the config and layers, in parallel.

A 404 or 5xx anywhere sends dockerd to Docker Hub for the whole pull.

Files a test may want to read after a failure stay in ``tmpdir``
(``daemon.json``, ``dockerd.log``); the daemon's own state (socket,
data-root, exec-root) lives in a short ``/tmp/dkd*`` directory, because unix
socket paths are limited to about 108 bytes and pytest's ``tmp_path`` is
long.  That directory is removed by :meth:`DockerDaemon.stop`.

Writes outside those directories: dockerd creates ``/run/docker/plugins``;
``stop`` removes it again when this daemon created it and it is empty.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from .harness import GO_PROXY_ENV, tail, wait_until

__all__ = ["DockerDaemon", "DockerDaemonError"]

_PLUGINS_DIR = Path("/run/docker/plugins")


def _default_docker_cli() -> str:
    # /usr/local/bin/docker may be a newer CLI than the daemon; prefer the one
    # shipped with the daemon by the docker.io package.
    if os.access("/usr/bin/docker", os.X_OK):
        return "/usr/bin/docker"
    return shutil.which("docker") or "docker"


class DockerDaemonError(RuntimeError):
    """dockerd did not start, or a docker command failed unexpectedly."""


class DockerDaemon:
    """A private dockerd using ``mirror_url`` as its Docker Hub mirror.

    Use as a context manager (``with DockerDaemon(tmp_path, url) as d:``) or
    call :meth:`start` and :meth:`stop` yourself.
    """

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        mirror_url: str,
        *,
        insecure_registries: Sequence[str] = (),
        dockerd: str = "dockerd",
        docker: str | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        debug: bool = True,
    ) -> None:
        self._check_mirror_url(mirror_url)
        self.tmpdir = Path(tmpdir)
        self.mirror_url = mirror_url
        mirror = urlsplit(mirror_url)
        # an https mirror is verified (its CA in /etc/docker/certs.d/HOST:PORT)
        plain = [mirror.netloc] if mirror.scheme == "http" else []
        self.insecure_registries = [*plain, *insecure_registries]
        self.dockerd = dockerd
        self.docker_cli = docker or _default_docker_cli()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.debug = debug

        self.config_path = self.tmpdir / "daemon.json"
        self.log_path = self.tmpdir / "dockerd.log"
        self.client_config_dir = self.tmpdir / "docker-client"
        # Set by start():
        self.state_dir: Path | None = None
        self.socket_path: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._created_plugins_dir = False

    @staticmethod
    def _check_mirror_url(mirror_url: str) -> None:
        parts = urlsplit(mirror_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"mirror_url must be http(s)://HOST:PORT, got {mirror_url!r}")
        if parts.path not in ("", "/"):
            # dockerd refuses to start with a mirror that has a path.
            raise ValueError(f"dockerd rejects a mirror URL with a path: {mirror_url!r}")

    # -- lifecycle ---------------------------------------------------------

    @property
    def host(self) -> str:
        """The ``-H`` value for the docker CLI."""
        if self.socket_path is None:
            raise DockerDaemonError("dockerd is not started")
        return f"unix://{self.socket_path}"

    def daemon_config(self) -> dict[str, Any]:
        assert self.state_dir is not None and self.socket_path is not None
        return {
            "storage-driver": "vfs",
            "iptables": False,
            "ip-forward": False,
            "ip-masq": False,
            "bridge": "none",
            "hosts": [f"unix://{self.socket_path}"],
            "data-root": str(self.state_dir / "root"),
            "exec-root": str(self.state_dir / "exec"),
            "pidfile": str(self.state_dir / "dockerd.pid"),
            # Else dockerd writes /etc/docker/key.json.
            "deprecated-key-path": str(self.state_dir / "key.json"),
            "registry-mirrors": [self.mirror_url],
            "insecure-registries": self.insecure_registries,
            "debug": self.debug,
        }

    def start(self) -> DockerDaemon:
        if self.process is not None:
            raise DockerDaemonError("dockerd is already started")
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.client_config_dir.mkdir(parents=True, exist_ok=True)
        self._created_plugins_dir = not _PLUGINS_DIR.parent.exists()
        # Short path: the socket and containerd's socket (exec/containerd/
        # containerd.sock) must stay below the ~108 byte sun_path limit.
        self.state_dir = Path(tempfile.mkdtemp(prefix="dkd", dir="/tmp"))
        self.socket_path = self.state_dir / "d.sock"
        self.config_path.write_text(json.dumps(self.daemon_config(), indent=2) + "\n")

        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(GO_PROXY_ENV)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.dockerd, "--config-file", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.state_dir,
                # Own process group: stop() can kill what is left of it.
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        last: list[str] = ["the socket never appeared"]

        def up() -> bool:
            assert self.process is not None and self.socket_path is not None
            if self.process.poll() is not None:
                raise DockerDaemonError(
                    f"dockerd exited with status {self.process.returncode} while starting; "
                    f"see {self.log_path}:\n{tail(self.log_path)}"
                )
            if not self.socket_path.exists():
                return False
            info = self.docker("info", "--format", "{{.ServerVersion}}", timeout=10)
            last[0] = info.stderr.strip()
            return info.returncode == 0

        try:
            wait_until(up, self.start_timeout, f"dockerd on {self.socket_path}", interval=0.2)
        except TimeoutError as e:
            raise DockerDaemonError(
                f"{e} (last answer: {last[0]}); see {self.log_path}:\n{tail(self.log_path)}"
            ) from None

    def stop(self) -> None:
        """SIGTERM dockerd, wait, SIGKILL what is left; remove its state."""
        proc, self.process = self.process, None
        containerd_pid = self._containerd_pid()
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._killpg(proc.pid)
                    proc.wait(10)
            # Anything dockerd left behind in its process group.
            self._killpg(proc.pid)
        if containerd_pid is not None:
            self._kill_containerd(containerd_pid)
        if self.state_dir is not None:
            self._unmount_below(self.state_dir)
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None
        if self._created_plugins_dir:
            for path in (_PLUGINS_DIR, _PLUGINS_DIR.parent):
                try:
                    path.rmdir()
                except OSError:
                    break  # not empty: another dockerd is using it
            self._created_plugins_dir = False

    def __enter__(self) -> DockerDaemon:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- docker CLI --------------------------------------------------------

    def docker(
        self, *args: str, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H unix://SOCK ARGS...`` and capture its output."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(GO_PROXY_ENV)
        # Keep the CLI away from ~/.docker (credential helpers, contexts).
        env["DOCKER_CONFIG"] = str(self.client_config_dir)
        result = subprocess.run(
            [self.docker_cli, "-H", self.host, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise DockerDaemonError(
                f"docker {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def pull(self, ref: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``docker pull REF``; does not raise on failure, check ``returncode``."""
        return self.docker("pull", ref, timeout=timeout)

    def image_inspect(self, ref: str) -> dict[str, Any]:
        """``docker image inspect REF`` as a dict (``Id``, ``RepoDigests``, ...)."""
        result = self.docker("image", "inspect", ref, timeout=30, check=True)
        images = json.loads(result.stdout)
        if len(images) != 1:
            raise DockerDaemonError(f"docker image inspect {ref}: expected 1 image, got {images!r}")
        image: dict[str, Any] = images[0]
        return image

    def reload(self, mirror_url: str | None = None) -> None:
        """Rewrite daemon.json (with *mirror_url* as the mirror, if given) and
        SIGHUP dockerd, which rereads ``registry-mirrors`` and
        ``insecure-registries``. Returns once the daemon log says so."""
        if self.process is None:
            raise DockerDaemonError("dockerd is not started")
        if mirror_url is not None:
            self._check_mirror_url(mirror_url)
            old_host = urlsplit(self.mirror_url).netloc
            extra = [r for r in self.insecure_registries if r != old_host]
            self.mirror_url = mirror_url
            self.insecure_registries = [urlsplit(mirror_url).netloc, *extra]
        self.config_path.write_text(json.dumps(self.daemon_config(), indent=2) + "\n")
        reloads = self.log_text().count("Reloaded configuration")
        self.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: self.log_text().count("Reloaded configuration") > reloads,
            10,
            f"dockerd to reload {self.config_path}",
        )

    # -- diagnostics -------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pull_log(self) -> list[str]:
        """dockerd's log lines about pull endpoints, for failure messages.

        ``Trying to pull NAME from URL v2`` names each endpoint tried (the
        mirror first, then Docker Hub); ``Attempting next endpoint for pull
        after error: ...`` says why the mirror was given up.
        """
        keys = (
            "Trying to pull",
            "Attempting next endpoint",
            "returned error",
            "pulling blob",
            "Fetching manifest",
            "Pulling ref from V2",
        )
        return [line for line in self.log_text().splitlines() if any(k in line for k in keys)]

    def fell_back(self) -> bool:
        """Whether dockerd gave up the mirror and tried Docker Hub for some pull."""
        return any(
            "Trying to pull" in line and "registry-1.docker.io" in line
            for line in self.log_text().splitlines()
        )

    # -- cleanup helpers ---------------------------------------------------

    @staticmethod
    def _killpg(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _containerd_pid(self) -> int | None:
        """The pid of the containerd this dockerd started, if any."""
        if self.state_dir is None:
            return None
        try:
            text = (self.state_dir / "exec" / "containerd" / "containerd.pid").read_text()
            return int(text.strip())
        except (OSError, ValueError):
            return None

    def _kill_containerd(self, pid: int) -> None:
        # dockerd stops its containerd on SIGTERM, and the kernel kills it
        # (Pdeathsig) if dockerd dies; make sure, but only while that pid is
        # still the containerd of this daemon.
        assert self.state_dir is not None
        marker = str(self.state_dir).encode()

        def gone() -> bool:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return True
            return marker not in cmdline  # exited, a zombie, or another process

        try:
            wait_until(gone, 3, f"containerd (pid {pid}) to exit", interval=0.1)
        except TimeoutError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _unmount_below(root: Path) -> None:
        """Lazily unmount anything dockerd left mounted below ``root``."""
        prefix = str(root)
        try:
            lines = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return
        points = []
        for line in lines:
            fields = line.split()
            if len(fields) > 4:
                point = fields[4].encode().decode("unicode_escape")
                if point == prefix or point.startswith(prefix + "/"):
                    points.append(point)
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
