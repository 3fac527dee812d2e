"""The node's lease over its life (pycni/overlay/lease.py) against a real file store, with a hand-moved clock.

No kernel here: the keeper decides, the node agent applies. Each test is one line of the life cycle drawn
in the module's docstring.
"""

from __future__ import annotations

import json
import logging

import pytest

from ipam.cluster import ClusterConfig, NodeConflict, NodeLease, acquire_lease, init_cluster, open_store
from pycni.overlay.lease import LAPSED, LOST, VALID, Identity, LeaseKeeper

ME = Identity("192.168.1.10", "0a:58:0a:00:00:0a", "node-a")
OTHER = Identity("192.168.1.11", "0a:58:0a:00:00:0b", "node-b")
TTL = 30


@pytest.fixture
def store(tmp_path):
    s = open_store(f"file://{tmp_path}/store")
    yield s
    s.close()


@pytest.fixture
def cfg(store):
    c = ClusterConfig("10.244.0.0/16")
    init_cluster(store, c)
    return c


def keeper(store, cfg, clock, me: Identity = ME) -> LeaseKeeper:
    return LeaseKeeper(store, cfg, me, TTL, logging.getLogger("test"), clock=clock)


def steal(store, subnet: str, who: Identity = OTHER) -> None:
    """Another node holds ``subnet`` now (the file store's own writes: a valid lease of another node)."""
    lease = NodeLease(subnet=subnet, public_ip=who.public_ip, vtep_mac=who.vtep_mac, node_name=who.node_name)
    store.put(lease.key, lease.to_json().encode())


def test_take_leases_and_records_when_the_lease_runs_out(store, cfg, clock):
    k = keeper(store, cfg, clock)
    k.take(previous=None, has_pods=False)
    assert k.state == VALID and k.subnet == "10.244.0.0/24"
    assert k.valid_until == pytest.approx(clock.now + TTL)
    assert store.ttl(k.lease.key) == TTL


def test_a_lapsed_lease_is_taken_back_when_the_subnet_is_still_free(store, cfg, clock):
    k = keeper(store, cfg, clock)
    k.take(None, has_pods=True)
    subnet = k.subnet
    clock.now += TTL + 1  # the agent could not renew in time: the store dropped it
    assert k.check_lapsed() and k.state == LAPSED
    assert not k.check_lapsed()  # said once
    assert store.get(k.lease.key) is None
    assert k.renew(has_pods=True) is False  # no renumbering
    assert k.state == VALID and k.subnet == subnet and store.get(k.lease.key) is not None


def test_a_subnet_taken_meanwhile_is_lost_never_renumbered_while_pods_run(store, cfg, clock):
    k = keeper(store, cfg, clock)
    k.take(None, has_pods=True)
    subnet = k.subnet
    clock.now += TTL + 1
    k.check_lapsed()
    steal(store, subnet)
    assert k.renew(has_pods=True) is False
    assert k.state == LOST and k.subnet == subnet
    assert OTHER.public_ip in k.problem and subnet in k.problem and "Drain" in k.problem
    # Still pods: every later attempt keeps the node on its subnet.
    assert k.renew(has_pods=True) is False and k.state == LOST and k.subnet == subnet
    # The other node goes: the subnet comes back to this node.
    store.delete(NodeLease(subnet=subnet, public_ip="", vtep_mac="").key)
    assert k.renew(has_pods=True) is False
    assert k.state == VALID and k.subnet == subnet and not k.problem


def test_a_lost_node_without_pods_leases_a_free_subnet(store, cfg, clock):
    k = keeper(store, cfg, clock)
    k.take(None, has_pods=True)
    subnet = k.subnet
    clock.now += TTL + 1
    steal(store, subnet)
    k.renew(has_pods=True)
    assert k.state == LOST
    assert k.renew(has_pods=False) is True  # nothing runs on the lost subnet: move on
    assert k.state == VALID and k.subnet != subnet


def test_exhaustion_while_lost_is_said_once_and_keeps_the_node_lost(store, clock, caplog):
    cfg = ClusterConfig("10.244.0.0/23", subnet_len=24)  # two subnets
    from ipam.cluster import init_cluster as init

    init(store, cfg)
    k = keeper(store, cfg, clock)
    k.take(None, has_pods=False)
    clock.now += TTL + 1
    steal(store, k.subnet)
    acquire_lease(store, cfg, "192.168.1.12", "0a:58:0a:00:00:0c", node_name="node-c")
    with caplog.at_level(logging.ERROR):
        k.renew(has_pods=False)
        k.renew(has_pods=False)
    assert k.state == LOST
    assert sum("cannot lease a new subnet" in r.message for r in caplog.records) == 1
    assert any("no free subnet" in r.message for r in caplog.records)


def test_a_restart_with_pods_on_a_subnet_another_node_holds_starts_lost(store, cfg, clock):
    previous = NodeLease(subnet="10.244.5.0/24", public_ip=ME.public_ip, vtep_mac=ME.vtep_mac, node_name=ME.node_name)
    steal(store, previous.subnet)
    k = keeper(store, cfg, clock)
    k.take(previous, has_pods=True)
    assert k.state == LOST and k.subnet == previous.subnet
    # Without pods (after a reboot) it leases another subnet instead.
    k2 = keeper(store, cfg, clock)
    k2.take(previous, has_pods=False)
    assert k2.state == VALID and k2.subnet != previous.subnet


def test_another_node_name_on_this_public_ip_is_refused(store, cfg, clock):
    keeper(store, cfg, clock).take(None, has_pods=False)
    impostor = Identity(ME.public_ip, "0a:58:0a:00:00:99", "impostor")
    with pytest.raises(NodeConflict) as caught:
        keeper(store, cfg, clock, impostor).take(None, has_pods=False)
    assert "impostor" in str(caught.value) and "node-a" in str(caught.value) and ME.public_ip in str(caught.value)


def test_a_renumbered_node_with_pods_takes_its_own_lease_over(store, cfg, clock):
    old = Identity("192.168.1.20", ME.vtep_mac, ME.node_name)
    first = keeper(store, cfg, clock, old)
    first.take(None, has_pods=False)
    previous = first.lease
    moved = keeper(store, cfg, clock, Identity("192.168.1.21", ME.vtep_mac, ME.node_name))
    moved.take(previous, has_pods=True)
    assert moved.state == VALID and moved.subnet == previous.subnet
    stored = json.loads(store.get(previous.key).value)
    assert stored["PublicIP"] == "192.168.1.21"
