"""A job across two machines: network namespaces joined by veth pairs, one ``launch`` per node, served through node
0's address. The text is the one rank's; a slow link still serves; a killed node, or a cut link, ends the whole job
on both nodes with the lost rank named; a node started with another layout is refused on both sides."""

from __future__ import annotations

import time

import psutil
import pytest

from client import GenerationClient
from tools.netns import Nodes, wait_ready

from .conftest import Server
from .test_tensor_parallel import REQUESTS, assert_same, reference  # noqa: F401

pytestmark = pytest.mark.timeout(600)
TIMEOUT_S = 10  # COLLECTIVE_TIMEOUT_S: a lost node must end the job within this + 30 s


@pytest.fixture
def nodes():
    n = Nodes(2)
    yield n
    n.close()


def start_job(nodes: Nodes, tmp_path, **env) -> tuple[Server, object]:
    """Node 1 then node 0; returns node 0 as a ``Server`` (reached on its host link) and node 1's process."""
    env = {"COLLECTIVE_TIMEOUT_S": str(TIMEOUT_S), "HTTP_PORT": "8000", "GRPC_PORT": "8001",
           "METRICS_PORT": "8002", "API_PORT": "9000", **env}
    follower = nodes.start(1, tmp_path / "node1.log", **env)
    leader = nodes.start(0, tmp_path / "node0.log", **env)
    server = Server(f"{nodes.public}:8000", f"{nodes.public}:8001", f"{nodes.public}:8002", leader,
                    tmp_path / "node0.log", f"{nodes.public}:9000")
    wait_ready(server.http, leader, server.log)
    return server, follower


def outputs(server):
    with GenerationClient(server.grpc, "grpc") as c:
        return [c.generate(prompt, **params) for prompt, params in REQUESTS]


def assert_both_end(server, follower, nodes, started, what):
    """Both nodes' launches exit non-zero within COLLECTIVE_TIMEOUT_S + 30 s of ``started``, leaving nothing."""
    for name, process in (("node 0", server.process), ("node 1", follower)):
        left = max(1.0, started + TIMEOUT_S + 30 - time.monotonic())
        code = process.wait(left)
        assert code != 0, f"{name} exited 0 after {what}"
    assert time.monotonic() - started < TIMEOUT_S + 30
    for node in (0, 1):
        deadline = time.monotonic() + 10
        while nodes.pids(node) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not nodes.pids(node), f"node {node} still runs {[psutil.Process(p).name() for p in nodes.pids(node)]}"


def test_two_stages_on_two_nodes_serve_the_same_text_over_a_slow_link_and_end_when_a_node_dies(
        nodes, tmp_path, reference):  # noqa: F811
    server, follower = start_job(nodes, tmp_path, PP="2")
    assert_same(outputs(server), reference, "PP=2 over two nodes")
    shaping = nodes.slow(1)
    assert_same(outputs(server), reference, f"PP=2 over two nodes, link shaped by {shaping}")
    started = time.monotonic()
    nodes.kill(1)
    assert_both_end(server, follower, nodes, started, "node 1 died")
    log = (tmp_path / "node0.log").read_text()
    assert "rank 1 (node 1) is lost" in log, log[-3000:]


def test_tp2_by_pp2_on_two_nodes_serves_the_same_text_and_a_cut_link_ends_both(nodes, tmp_path, reference):  # noqa: F811
    server, follower = start_job(nodes, tmp_path, TP="2", PP="2")
    assert_same(outputs(server), reference, "TP=2 x PP=2 over two nodes")
    started = time.monotonic()
    nodes.cut(1)
    assert_both_end(server, follower, nodes, started, "the link was cut")
    assert "rank 2 (node 1) is lost" in (tmp_path / "node0.log").read_text()  # the last stage's, TP rank 0
    assert "rank 0 (node 0) is lost" in (tmp_path / "node1.log").read_text()


def test_a_node_started_with_another_layout_is_refused_on_both_sides(nodes, tmp_path):
    # Node 1 believes in a job of four nodes: torchrun's rendezvous would wait for the two that never come.
    env = {"COLLECTIVE_TIMEOUT_S": str(TIMEOUT_S), "API": "0"}
    follower = nodes.start(1, tmp_path / "node1.log", TP="2", PP="2", NNODES="4", **env)
    leader = nodes.start(0, tmp_path / "node0.log", TP="1", PP="2", **env)
    assert leader.wait(120) == 2 and follower.wait(120) == 2
    for node in (0, 1):
        log = (tmp_path / f"node{node}.log").read_text()
        assert "configuration error: node 1 has TP=2 where node 0 has TP=1" in log, log[-3000:]
        assert "configuration error: node 1 has NNODES=4 where node 0 has NNODES=2" in log, log[-3000:]
        assert "Traceback" not in log and "rank 0" not in log  # refused before torchrun: no rank started
