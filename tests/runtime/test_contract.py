"""Pure pieces of the group bootstrap: the `ray start` commands and the rendezvous bookkeeping."""

from __future__ import annotations

import json

import pytest
from ling_runtime.distributed.ray_launcher import HUNG_AFTER_S, missing_node_ranks, rank_alive
from ling_runtime.distributed.ray_node import node_resource, ray_start_argv


def test_head_command_binds_the_pod_ip_and_labels_the_node() -> None:
    argv = ray_start_argv(0, "10.1.2.3", 6379, head=True, num_cpus=2)
    assert argv[1:3] == ["start", "--block"] and "--head" in argv
    assert argv[argv.index("--node-ip-address") + 1] == "10.1.2.3"
    assert argv[argv.index("--port") + 1] == "6379"
    assert json.loads(argv[argv.index("--resources") + 1]) == {node_resource(0): 1000}
    assert "--include-dashboard=false" in argv and argv[argv.index("--num-cpus") + 1] == "2"
    with_ports = ray_start_argv(
        0, "10.1.2.3", 6379, head=True, ports={"--metrics-export-port": 4242, "--bogus": 1}
    )
    assert with_ports[with_ports.index("--metrics-export-port") + 1] == "4242" and "--bogus" not in with_ports


def test_worker_command_joins_the_head() -> None:
    argv = ray_start_argv(1, "10.1.2.4", 6379, head=False, head_address="ling-0-0.ling-ranks.ns.svc:6379")
    assert "--head" not in argv and argv[argv.index("--address") + 1] == "ling-0-0.ling-ranks.ns.svc:6379"
    assert json.loads(argv[argv.index("--resources") + 1]) == {"ling_node_1": 1000}
    with pytest.raises(ValueError, match="head_address"):
        ray_start_argv(1, "10.1.2.4", 6379, head=False)


def test_missing_node_ranks_come_from_the_node_labels() -> None:
    alive = [{"CPU": 2.0, "ling_node_0": 1000.0}, {"CPU": 2.0, "ling_node_2": 1000.0}]
    assert missing_node_ranks(alive, 3) == [1]
    assert missing_node_ranks([*alive, {"ling_node_1": 1000.0}], 3) == []
    assert missing_node_ranks([], 2) == [0, 1]


def test_a_late_ping_is_not_a_dead_rank_until_it_stays_late() -> None:
    # One slow answer on a loaded node must not restart the group; a stopped rank still fails it, and an
    # actor Ray reports dead fails it at once.
    assert rank_alive(now=100.0, late_since=100.0, died=False)
    assert rank_alive(now=100.0 + HUNG_AFTER_S - 0.5, late_since=100.0, died=False)
    assert not rank_alive(now=100.0 + HUNG_AFTER_S, late_since=100.0, died=False)
    assert not rank_alive(now=100.0, late_since=100.0, died=True)
