"""fsck: rotten bytes are quarantined and fetched again; the index matches the disk."""

from __future__ import annotations

import json

import pytest_twisted

from registryproxy.cache.fsck import fsck


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

    report = await fsck(proxy.proxy.store, proxy.proxy.access)
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
    report = await fsck(proxy.proxy.store, proxy.proxy.access)
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

    report = await fsck(proxy.proxy.store, proxy.proxy.access)
    assert sorted(report.quarantined) == sorted([digest, layer])
    kept = {p.read_bytes() for p in (proxy.cache_dir / "quarantine").iterdir()}
    assert kept == {b"rotted layer!", b"{rotten manifest}"}
    reply = await proxy.get("/v2/app/manifests/1")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "MISS", body)
    reply = await proxy.get(f"/v2/app/blobs/{layer}")
    assert (reply.code, reply.header("X-Cache"), reply.body) == (200, "MISS", b"rotting layer")
