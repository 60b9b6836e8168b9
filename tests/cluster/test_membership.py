"""Nodes find each other through PostgreSQL: heartbeats, no static list."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from registryproxy.cluster.membership import Membership, NameTaken, Node, rendezvous
from registryproxy.cluster.settings import ClusterSettings

pytestmark = pytest.mark.cluster


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def node(db, name: str, timeout: float = 10.0) -> Membership:
    return Membership(db, name, f"http://127.0.0.1:1{len(name)}/{name}", reactor, 0.2, timeout)


@pytest_twisted.ensureDeferred
async def test_nodes_see_each_other_and_share_one_secret(make_database):
    db1, db2 = await make_database(), await make_database()
    one, two = node(db1, "node-1"), node(db2, "node-2")
    await one.join()
    await two.join()
    await one.heartbeat()
    assert [n.name for n in one.live] == [n.name for n in two.live] == ["node-1", "node-2"]
    assert one.secret and one.secret == two.secret
    assert {n.advertise for n in two.live} == {one.advertise, two.advertise}


@pytest_twisted.ensureDeferred
async def test_a_silent_node_drops_out_and_a_leaving_one_at_once(make_database):
    db = await make_database()
    one, two, three = node(db, "a", 1.0), node(db, "b", 1.0), node(db, "c", 1.0)
    for member in (one, two, three):
        await member.join()
    await three.leave()
    await one.heartbeat()
    assert [n.name for n in one.live] == ["a", "b"]
    # b falls silent (killed): a stops seeing it after the timeout
    await sleep(1.2)
    await one.heartbeat()
    assert [n.name for n in one.live] == ["a"]


@pytest_twisted.ensureDeferred
async def test_a_live_nodes_name_is_not_taken_twice(make_database):
    db = await make_database()
    first = node(db, "node-1", 1.0)
    await first.join()
    with pytest.raises(NameTaken, match="node-1"):
        await node(db, "node-1", 1.0).join()
    await sleep(1.2)  # the first one died without leaving: its name is free again
    again = node(db, "node-1", 1.0)
    await again.join()
    assert [n.name for n in again.live] == ["node-1"]


@pytest_twisted.ensureDeferred
async def test_heartbeats_run_as_a_service(make_database):
    db = await make_database()
    watcher, member = node(db, "watcher", 1.0), node(db, "member", 1.0)
    await watcher.join()
    await member.join()
    member.startService()
    try:
        await sleep(1.5)  # longer than the timeout: only heartbeats keep it in
        await watcher.heartbeat()
        assert "member" in [n.name for n in watcher.live]
    finally:
        await member.stopService()
    await watcher.heartbeat()
    assert [n.name for n in watcher.live] == ["watcher"]


def test_rendezvous_moves_only_the_keys_of_a_node_that_goes():
    nodes = [Node(f"n{i}", f"http://n{i}", 0.0, 0.0) for i in range(3)]
    keys = [f"sha256:{i:064x}" for i in range(3000)]
    before = {key: rendezvous(key, nodes) for key in keys}
    counts = {n.name: sum(1 for o in before.values() if o == n) for n in nodes}
    assert all(800 < c < 1200 for c in counts.values()), counts  # spread evenly
    after = {key: rendezvous(key, nodes[:2]) for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == nodes[2] for key in moved)
    assert rendezvous("x", []) is None


@pytest_twisted.ensureDeferred
async def test_a_node_told_of_a_removal_keeps_what_it_answered_since(make_database):
    """A purge tells every node to forget its answers in memory, with the
    generation it wrote: a node that did so keeps the answers it makes
    afterwards at its next refresh (they are fresh); another removal later
    still makes it forget."""
    db = await make_database()
    await node(db, "a").join()  # makes the tables
    purger, told = ClusterSettings(db), ClusterSettings(db)
    await purger.refresh()
    await told.refresh()
    purger.bump()
    generation = await purger.written()
    assert generation is not None
    assert not await purger.refresh()  # its own removal: it forgot already
    told.seen(generation)
    assert not await told.refresh()
    purger.bump()  # a removal nobody told it of
    await purger.written()
    assert await told.refresh()
