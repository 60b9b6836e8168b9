"""fsck: rotten bytes are quarantined and fetched again; the index matches the disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from registryproxy.admin.backend import AdminError
from registryproxy.admin.fsck import Fsck
from registryproxy.cache import fsck as fsck_module
from registryproxy.cache import scan as scan_module
from registryproxy.cache.fsck import ScanFailed, _forget, _index, _Scan, fsck, scan
from registryproxy.cache.index import Index


@pytest_twisted.ensureDeferred
async def test_fsck_quarantines_rotten_blobs(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/app", "1", [b"good layer", b"rotting layer"])
    proxy = await make_proxy(fake_registry.url)
    await proxy.get("/v2/app/manifests/1")
    good, rotten = (layer["digest"] for layer in json.loads(body)["layers"])
    for layer in (good, rotten):
        await proxy.get(f"/v2/app/blobs/{layer}")
    proxy.blob_path(rotten).write_bytes(b"rotted layer!")
    stray = proxy.blob_path(fake_registry.add_blob(b"stray"))
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"stray")

    report = await fsck(proxy.proxy.store, proxy.proxy.access, reactor)
    assert report.quarantined == (rotten,)
    assert report.checked == 4  # the manifest, two layers, the stray file
    assert report.indexed == ("sha256:" + stray.name,)
    assert not proxy.blob_path(rotten).exists()
    assert len(list((proxy.cache_dir / "quarantine").iterdir())) == 1
    reply = await proxy.get(f"/v2/app/blobs/{rotten}")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "MISS", b"rotting layer")
    assert (await proxy.get(f"/v2/app/blobs/{good}")).header("X-Cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_fsck_forgets_files_that_vanished(fake_registry, make_proxy):
    _, body = fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    layer = json.loads(body)["layers"][0]["digest"]
    await proxy.get(f"/v2/app/blobs/{layer}")
    proxy.blob_path(layer).unlink()
    import time

    time.sleep(0.01)
    report = await fsck(proxy.proxy.store, proxy.proxy.access, reactor)
    assert report.forgotten == (layer,)
    assert proxy.proxy.index.total_size() == 0


@pytest_twisted.ensureDeferred
async def test_fsck_keeps_every_rotten_file(fake_registry, make_proxy):
    digest, body = fake_registry.add_image("library/app", "1", [b"rotting layer"])
    proxy = await make_proxy(fake_registry.url)
    await proxy.get("/v2/app/manifests/1")
    layer = json.loads(body)["layers"][0]["digest"]
    await proxy.get(f"/v2/app/blobs/{layer}")
    proxy.blob_path(layer).write_bytes(b"rotted layer!")
    proxy.blob_path(digest).write_bytes(b"{rotten manifest}")

    report = await fsck(proxy.proxy.store, proxy.proxy.access, reactor)
    assert sorted(report.quarantined) == sorted([digest, layer])
    kept = {p.read_bytes() for p in (proxy.cache_dir / "quarantine").iterdir()}
    assert kept == {b"rotted layer!", b"{rotten manifest}"}
    reply = await proxy.get("/v2/app/manifests/1")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "MISS", body)
    reply = await proxy.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "MISS", b"rotting layer")


@pytest_twisted.ensureDeferred
async def test_the_hashing_is_done_by_a_child_process(fake_registry, make_proxy, monkeypatch):
    """Not in regproxy's process, whose clients would wait for its GIL: a
    hash here would fail the fsck."""
    _, body = fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    layer = json.loads(body)["layers"][0]["digest"]
    await proxy.get(f"/v2/app/blobs/{layer}")
    proxy.blob_path(layer).write_bytes(b"rotted")

    def here(*args):
        raise AssertionError("hashed in regproxy's own process")

    monkeypatch.setattr(scan_module, "hashed", here)
    report = await fsck(proxy.proxy.store, proxy.proxy.access, reactor)
    assert (report.checked, report.quarantined) == (1, (layer,))


@pytest_twisted.ensureDeferred
async def test_a_scan_that_fails_says_why_and_mends_nothing(tmp_path):
    (tmp_path / "blobs").mkdir()
    with pytest.raises(ScanFailed) as e:
        await scan(reactor, str(tmp_path), str(tmp_path / "no" / "index.db"), 0.0)
    assert "unable to open database file" in str(e.value)


@pytest.mark.parametrize(
    "lines",
    [
        b"rotten ../../etc/passwd\nchecked 1 1\n",
        b"unindexed sha256:" + b"a" * 64 + b" -1\nchecked 1 1\n",
        b"forget everything\n",
        b"x" * 1000,
    ],
)
def test_a_scan_that_says_what_it_should_not_is_killed_and_refused(lines):
    """Every line is checked (a digest's grammar, a size), and one that is
    not what the scan writes stops it: nothing it said is acted on."""
    kills = []
    protocol = _Scan(Clock())
    protocol.transport = SimpleNamespace(signalProcess=kills.append)
    protocol.outReceived(b"rotten sha256:" + b"b" * 64 + b"\n" + lines)
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))
    assert kills == ["KILL"]
    failure = []
    protocol.done.addErrback(failure.append)
    assert failure and failure[0].check(ScanFailed)
    assert "unexpected line" in str(failure[0].value) or "too long" in str(failure[0].value)


def test_the_scan_stops_when_regproxy_is_gone(tmp_path, monkeypatch):
    """A scan whose regproxy died does not go on hashing a whole store."""
    for i in range(600):
        data = b"blob %d" % i
        hexa = hashlib.sha256(data).hexdigest()
        path = tmp_path / "blobs" / "sha256" / hexa[:2] / hexa
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    out = io.StringIO()
    with pytest.raises(SystemExit):
        scan_module.scan(
            str(tmp_path),
            str(tmp_path / "index.db"),
            0.0,
            out,
            scan_module.Watch(os.getppid() + 1, out),
        )
    assert "checked" not in out.getvalue()


def test_the_scan_dies_with_regproxy(tmp_path):
    """Killed at once (SIGKILL), regproxy leaves no scan hashing on: a big
    file (sparse: no disk) would take it seconds."""
    big = tmp_path / "blobs" / "sha256" / "ab" / ("ab" + "0" * 62)
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(4 << 30)
    Index(str(tmp_path / "index.db")).close()
    parent = subprocess.run(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-m',"
            " 'registryproxy.cache.scan', *sys.argv[1:4], str(__import__('os').getpid())],"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
            " print(child.pid, flush=True); time.sleep(0.5);"
            " print('hashing' if child.poll() is None else 'ended', flush=True);"
            " __import__('os')._exit(0)",
            str(tmp_path),
            str(tmp_path / "index.db"),
            "0.0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(scan_module.__file__).parents[2],  # where registryproxy is
    )
    child, state = parent.stdout.split()
    assert state == "hashing", parent.stderr  # when its regproxy died
    child = int(child)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the scan went on hashing after regproxy died"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest_twisted.ensureDeferred
async def test_the_scan_runs_on_regproxys_modules_wherever_it_is_started(
    fake_registry, make_proxy, monkeypatch, tmp_path
):
    """Neither the environment's PYTHONPATH nor the working directory (the
    child's is the store) brings in other modules than regproxy's own."""
    _, body = fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    layer = json.loads(body)["layers"][0]["digest"]
    await proxy.get(f"/v2/app/blobs/{layer}")
    hostile = tmp_path / "hostile"
    for where in (hostile, proxy.cache_dir):
        (where / "registryproxy").mkdir(parents=True)
        (where / "registryproxy" / "__init__.py").write_text("raise SystemExit(3)\n")
        (where / "sqlite3.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(hostile))
    monkeypatch.chdir(hostile)
    report = await fsck(proxy.proxy.store, proxy.proxy.access, reactor)
    assert (report.checked, report.quarantined) == (1, ())


@pytest_twisted.ensureDeferred
async def test_only_the_stores_own_regular_files_are_scanned(fake_registry, make_proxy):
    """A copy of a blob in another shard is not the blob (its wrong bytes
    do not condemn the right ones), and a FIFO named like one would block
    the scan for ever."""
    _, body = fake_registry.add_image("library/app", "1", [b"good layer"])
    proxy = await make_proxy(fake_registry.url)
    layer = json.loads(body)["layers"][0]["digest"]
    await proxy.get(f"/v2/app/blobs/{layer}")
    hexa = layer.split(":")[1]
    elsewhere = proxy.cache_dir / "blobs" / "sha256" / "zz" / hexa
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"bad copy")
    fifo = proxy.cache_dir / "blobs" / "sha256" / "ab" / ("ab" + "1" * 62)
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    report = await fsck(proxy.proxy.store, proxy.proxy.access, reactor)
    assert (report.checked, report.quarantined, report.indexed) == (1, (), ())
    assert proxy.blob_path(layer).read_bytes() == b"good layer"


@pytest_twisted.ensureDeferred
async def test_what_changed_since_the_scan_is_left_as_it_is(fake_registry, make_proxy):
    """A file come back since the scan saw it gone keeps its row; one the
    index learnt of meanwhile is not indexed again."""
    _, body = fake_registry.add_image("library/app", "1", [b"layer one", b"layer two"])
    proxy = await make_proxy(fake_registry.url)
    one, two = (layer["digest"] for layer in json.loads(body)["layers"])
    for layer in (one, two):
        await proxy.get(f"/v2/app/blobs/{layer}")
    store, index = proxy.proxy.store, proxy.proxy.index
    before = index.blob_sizes([one, two])
    stored_at = dict(index._db.execute("SELECT digest, stored_at FROM blobs"))
    assert _forget(store, [one], index) == []
    assert _index(store, [(two, 3)], index) == []
    assert index.blob_sizes([one, two]) == before
    assert dict(index._db.execute("SELECT digest, stored_at FROM blobs")) == stored_at


def test_what_the_scan_says_on_stderr_is_logged(monkeypatch):
    """A file it cannot read (a bad sector) is quarantined as rotten, and
    the operator reads why in regproxy's log."""
    said: list[str] = []
    monkeypatch.setattr(fsck_module.log, "warn", lambda fmt, **kw: said.append(fmt.format(**kw)))
    protocol = _Scan(Clock())
    protocol.errReceived(b"cannot read sha256:" + b"c" * 64 + b": Input/output error\n")
    assert said == ["fsck's scan: cannot read sha256:" + "c" * 64 + ": Input/output error"]


def test_a_file_that_cannot_be_read_is_rotten_not_the_end_of_the_scan(tmp_path, capsys):
    """(A directory stands for a bad sector: reading it fails with an OSError.)"""
    digest = "sha256:" + "a" * 64
    assert scan_module.hashed(digest, str(tmp_path), lambda: None) == (0, False)
    assert f"cannot read {digest}" in capsys.readouterr().err


def test_a_scan_silent_for_long_is_killed_and_fails_at_once():
    """Only silence counts: a scan that says it goes on may take hours;
    one stuck in a disk's read is given up without waiting for it to end
    (a process in a read dies only when the read does)."""
    clock, kills = Clock(), []
    protocol = _Scan(clock, stall=60)
    protocol.makeConnection(SimpleNamespace(signalProcess=kills.append))
    failure: list[Failure] = []
    protocol.done.addErrback(failure.append)
    for _ in range(5):
        clock.advance(59)
        protocol.outReceived(b"going\n")
    clock.advance(59)
    assert (kills, failure) == ([], [])
    clock.advance(1)
    assert kills == ["KILL"]
    assert failure and "said nothing for 60 s" in str(failure[0].value)
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))  # (later: nothing more)


@pytest_twisted.ensureDeferred
async def test_a_stuck_scan_process_is_killed():
    """The deadline kills a real process (one that sleeps stands for one
    stuck in a read)."""
    protocol = _Scan(reactor, stall=0.2)
    process = reactor.spawnProcess(
        protocol, sys.executable, [sys.executable, "-c", "import time; time.sleep(30)"]
    )
    with pytest.raises(ScanFailed, match="said nothing for 0.2 s"):
        await protocol.done
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(process.pid or 0):
        await deferLater(reactor, 0.02, lambda: None)
    assert process.pid is None or not _alive(process.pid)


@pytest_twisted.ensureDeferred
async def test_an_fsck_whose_scan_is_stuck_fails_and_the_next_one_runs(
    fake_registry, make_proxy, monkeypatch
):
    """The admin API answers 500 saying why, and does not refuse every
    later fsck as already running."""
    _, body = fake_registry.add_image("library/app", "1", [b"layer"])
    proxy = await make_proxy(fake_registry.url)
    assert (await proxy.get("/v2/library/app/manifests/1")).code == 200
    checker = Fsck(proxy.proxy.store, proxy.proxy.access, reactor)
    monkeypatch.setattr(fsck_module, "STALL_SECONDS", 0.2)
    monkeypatch.setattr(fsck_module, "_BOOT", "import time; time.sleep(30)")
    with pytest.raises(AdminError) as e:
        await checker.fsck()
    assert e.value.status == 500
    assert "said nothing for 0.2 s" in e.value.message
    monkeypatch.undo()
    stored = [f for f in (proxy.cache_dir / "blobs").rglob("*") if f.is_file()]
    assert stored and (await checker.fsck()).checked == len(stored)


def test_the_scan_says_it_goes_on_once_a_second_while_it_reads(tmp_path):
    """Between files and between the MiBs of one big file."""
    data = b"x" * (3 << 20)
    hexa = hashlib.sha256(data).hexdigest()
    path = tmp_path / "blobs" / "sha256" / hexa[:2] / hexa
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    Index(str(tmp_path / "index.db")).close()
    ticks = iter(range(0, 1000, 1))
    out = io.StringIO()
    watch = scan_module.Watch(os.getppid(), out, now=lambda: float(next(ticks)) / 2)
    scan_module.scan(str(tmp_path), str(tmp_path / "index.db"), 0.0, out, watch)
    lines = out.getvalue().splitlines()
    assert lines.count("going") >= 2, lines
    assert lines[-1] == f"checked 1 {len(data)}"
