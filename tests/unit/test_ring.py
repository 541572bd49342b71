"""Placement on the L2 ring: spread, movement on join and leave, anti-affinity.

Tolerances are stated, inputs deterministic: 50,000 keys of the test
namespace, md5 with 160 points per node (the uhashring/ketama defaults).
"""

from __future__ import annotations

from collections import Counter

import pytest

from kvcache.errors import ConfigError
from kvcache.ring import NodeInfo, Ring
from tests.support.kvcache_blocks import key

KEYS = [key(i) for i in range(50_000)]
#: Each node's share of keys stays within this fraction of the ideal 1/N.
SHARE_TOLERANCE = 0.20


def nodes(count: int, **labels: str) -> list[NodeInfo]:
    return [NodeInfo.make(f"n{i}", f"10.0.0.{i}:7000", labels) for i in range(count)]


@pytest.mark.parametrize("count", [3, 5, 8])
def test_keys_spread_evenly_within_tolerance(count: int) -> None:
    ring = Ring(nodes(count))
    shares = Counter(ring.owner(k) for k in KEYS)
    ideal = len(KEYS) / count
    assert len(shares) == count
    for node, owned in shares.items():
        assert abs(owned - ideal) <= SHARE_TOLERANCE * ideal, (node, owned / ideal)


@pytest.mark.parametrize("count", [4, 5, 9])
def test_a_join_moves_about_one_nth_of_keys_all_to_the_new_node(count: int) -> None:
    before = Ring(nodes(count))
    after = before.with_node(NodeInfo.make("new", "10.0.1.1:7000"))
    moved = [k for k in KEYS if before.owner(k) != after.owner(k)]
    ideal = len(KEYS) / (count + 1)
    assert 0.75 * ideal <= len(moved) <= 1.25 * ideal
    assert {after.owner(k) for k in moved} == {"new"}


def test_a_leave_moves_only_the_leaving_nodes_keys() -> None:
    before = Ring(nodes(5))
    after = before.without("n2")  # type: ignore[arg-type]
    for k in KEYS[:5000]:
        if before.owner(k) != "n2":
            assert after.owner(k) == before.owner(k)
        else:
            assert after.owner(k) == before.candidates(k, 2)[1], "the next node clockwise takes over"


def test_replicas_land_in_distinct_zones_when_there_are_enough() -> None:
    members = [
        NodeInfo.make(f"n{z}{h}", f"10.{z}.{h}.1:7000", {"zone": f"z{z}", "host": f"h{z}{h}"})
        for z in range(3)
        for h in range(2)
    ]
    ring = Ring(members)
    for k in KEYS[:3000]:
        placed = ring.placement(k, 3)
        assert placed[0] == ring.owner(k)
        assert len({ring.nodes[n].zone for n in placed}) == 3


def test_replicas_fall_back_to_distinct_hosts_then_any_node() -> None:
    # Two zones for three copies; four nodes on three hosts.
    members = [
        NodeInfo.make("a", "10.0.0.1:7000", {"zone": "z1", "host": "h1"}),
        NodeInfo.make("b", "10.0.0.1:7001", {"zone": "z1", "host": "h1"}),
        NodeInfo.make("c", "10.0.0.2:7000", {"zone": "z2", "host": "h2"}),
        NodeInfo.make("d", "10.0.0.3:7000", {"zone": "z2", "host": "h3"}),
    ]
    ring = Ring(members)
    for k in KEYS[:3000]:
        three = ring.placement(k, 3)
        assert len({ring.nodes[n].zone for n in three}) == 2
        assert len({ring.nodes[n].host for n in three}) == 3
        four = ring.placement(k, 4)
        assert sorted(four) == ["a", "b", "c", "d"]


def test_without_labels_the_address_host_is_the_failure_domain() -> None:
    members = [NodeInfo.make(f"n{i}", f"10.0.0.{i % 2}:{7000 + i}") for i in range(4)]
    ring = Ring(members)
    for k in KEYS[:2000]:
        assert len({ring.nodes[n].host for n in ring.placement(k, 2)}) == 2


def test_placement_is_capped_by_the_ring_size() -> None:
    ring = Ring(nodes(2))
    assert len(ring.placement(KEYS[0], 5)) == 2
    assert Ring([]).placement(KEYS[0], 2) == []
    assert Ring([]).owner(KEYS[0]) is None


@pytest.mark.parametrize(
    ("spec", "node_id", "address", "labels"),
    [
        pytest.param("127.0.0.1:7001", "127.0.0.1:7001", "127.0.0.1:7001", {}, id="address-only"),
        pytest.param("a=h:1", "a", "h:1", {}, id="with-id"),
        pytest.param("a=h:1?host=x&zone=y", "a", "h:1", {"host": "x", "zone": "y"}, id="with-labels"),
    ],
)
def test_node_specs_parse_and_round_trip(spec: str, node_id: str, address: str, labels: dict[str, str]) -> None:
    node = NodeInfo.parse(spec)
    assert (node.node_id, node.address, dict(node.labels)) == (node_id, address, labels)
    assert NodeInfo.parse(node.spec()) == node
    assert NodeInfo.from_json(node.to_json()) == node


@pytest.mark.parametrize("spec", ["nohostport", "a=:1", "a=h:port"])
def test_a_bad_node_spec_is_a_config_error(spec: str) -> None:
    with pytest.raises(ConfigError):
        NodeInfo.parse(spec)


@pytest.mark.parametrize("count", [1, 2, 5, 17])
def test_the_ring_walk_is_uhashrings_own_order(count: int) -> None:
    # Nodes and clients of any version must place a key alike: the bisect walk
    # must give exactly what uhashring's range() gives over the same points.
    ring = Ring([NodeInfo.make(f"n{i}", f"10.0.0.{i}:7400", {"host": f"h{i}"}) for i in range(count)])
    for index in range(500):
        block = bytes(key(index))
        theirs = [node["instance"] for node in ring._ring.range(block.hex(), size=None, unique=True)]
        assert ring.candidates(block) == theirs
        assert ring.candidates(block, 2) == theirs[:2]
        assert ring.owner(block) == theirs[0]
