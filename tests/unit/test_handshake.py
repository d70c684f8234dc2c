"""Nodes checking in with node 0 before torchrun (``ranks/handshake.py``), over real localhost sockets."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import pytest

from triton_backend.ranks import handshake

pytestmark = pytest.mark.timeout(60)
VIEW = {"TP": 1, "PP": 2, "PP_LAYERS": "", "NNODES": 2, "DTYPE": "float32", "DEVICE": "cpu",
        "CHECKPOINT": "iter_0000001, architecture 0123456789ab"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(nodes: list[tuple[int, dict]], view: dict = VIEW, deadline_s: float = 20, leader_delay: float = 0,
        stagger: float = 0, port: int | None = None, grace_s: float = handshake.GRACE_S):
    """Node 0 leading with ``view`` (its NNODES) and each (node, view) following, ``stagger`` seconds apart; every
    node's answer, node 0's first."""
    port = port or free_port()

    def leader():
        time.sleep(leader_delay)
        return handshake.lead(port, view["NNODES"], view, deadline_s, grace_s)

    with concurrent.futures.ThreadPoolExecutor(len(nodes) + 1) as pool:
        lead = pool.submit(leader)
        follows = []
        for node, theirs in nodes:
            follows.append(pool.submit(handshake.follow, "127.0.0.1", port, node, theirs, deadline_s))
            time.sleep(stagger)
        return [lead.result()] + [f.result() for f in follows]


THREE = dict(VIEW, NNODES=3)


def test_nodes_that_agree_all_go_and_the_port_is_free_for_torchrun():
    port = free_port()
    assert job([(1, THREE), (2, THREE)], THREE, port=port) == [[], [], []]
    with socket.create_server(("", port)):  # closed before "go": torchrun's store can bind it at once
        pass


def test_a_node_with_another_nnodes_is_refused_on_both_sides():
    leader, node = job([(1, dict(VIEW, NNODES=4))])
    assert leader == node == ["node 1 has NNODES=4 where node 0 has NNODES=2"]


def test_every_difference_is_named_and_the_waiting_nodes_are_told_too():
    # node 1 is in and waiting when node 2 comes with another TP and checkpoint
    answers = job([(1, THREE), (2, dict(THREE, TP=2, CHECKPOINT="iter_0000002"))], THREE, stagger=1)
    want = ["node 2 has TP=2 where node 0 has TP=1",
            "node 2 has CHECKPOINT=iter_0000002 where node 0 has CHECKPOINT=iter_0000001, architecture 0123456789ab"]
    assert answers == [want] * 3


def test_a_node_that_comes_after_the_refusal_hears_it_too():
    # node 2 is refused before node 1 checks in: node 1 is told within the grace rather than waiting out its deadline
    answers = job([(2, dict(THREE, DTYPE="bfloat16")), (1, THREE)], THREE, stagger=1.5)
    assert answers == [["node 2 has DTYPE=bfloat16 where node 0 has DTYPE=float32"]] * 3


def test_a_node_rank_given_twice_is_refused():
    assert job([(1, THREE), (1, THREE)], THREE, stagger=1, grace_s=1) == [
        ["two nodes were started with NODE_RANK=1"]] * 3


def test_a_node_started_before_node_0_waits_for_it():
    assert job([(1, VIEW)], leader_delay=2.5) == [[], []]


def test_strangers_on_the_port_are_ignored():
    port = free_port()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        lead = pool.submit(handshake.lead, port, 2, VIEW, 20)
        for garbage in (b"GET / HTTP/1.1\r\n\r\n", b'{"node": "x"}\n', b""):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as stranger:
                        stranger.sendall(garbage)
                    break
                except ConnectionRefusedError:
                    time.sleep(0.1)
        assert handshake.follow("127.0.0.1", port, 1, VIEW, 20) == []
        assert lead.result() == []


def test_a_missing_node_ends_the_wait_with_its_name():
    port = free_port()
    assert handshake.lead(port, 3, dict(VIEW, NNODES=3), 1.5) == [
        f"nodes 1, 2 of NNODES=3 did not check in at MASTER_PORT={port} within 2 s"]
    assert handshake.follow("127.0.0.1", free_port(), 1, VIEW, 1.5)[0].startswith("node 0 did not answer")
