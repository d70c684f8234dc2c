"""Nodes check in with node 0 before the job starts: a node with another configuration is refused on both sides.

torchrun's static rendezvous cannot tell a mismatched node from a late one: a node given another NNODES waits for
a group that never forms, until the rendezvous times out, and the nodes already there wait with it. So before
torchrun starts, each node sends node 0 its view of the job (``agreement.fingerprint``: TP, PP, PP_LAYERS, EP, NNODES,
DTYPE, DEVICE and what the checkpoint is) over ``MASTER_PORT``, one JSON line. Node 0 compares each with its own;
once every node has checked in and agrees, it closes the port, answers each node "go" and starts torchrun, whose
store then takes the same port (its clients retry until it listens). A difference, a node rank given twice or a
node missing at the deadline is answered with the reasons, on every node, and no torchrun starts.

Plain sockets rather than torch's ``TCPStore``: the store has no way to refuse a client with a message, and a
node whose NNODES differs would wait on keys that never come.
"""

from __future__ import annotations

import json
import socket
import time

DEADLINE_S = 600.0  # as long as torchrun's own static rendezvous waits for its nodes
GRACE_S = 10.0  # after a refusal, how long node 0 still answers the nodes that have not heard it yet
_READ_S = 10.0  # a connection that sends no line in this long is not a node of ours


def _line(conn: socket.socket, timeout: float) -> dict | None:
    """One JSON object read from ``conn`` (None: nothing, or not JSON)."""
    conn.settimeout(timeout)
    try:
        with conn.makefile("r", encoding="utf-8") as reader:
            value = json.loads(reader.readline(65536) or "null")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _send(conn: socket.socket, value: dict) -> None:
    try:
        conn.sendall((json.dumps(value) + "\n").encode())
    except OSError:
        pass  # a node that left: torchrun would not have met it either


def _listener(port: int) -> socket.socket:
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", port))


def _judge(message: dict, view: dict, nnodes: int, joined: dict) -> list[str]:
    node = message["node"]
    problems = [f"node {node} has {key}={value} where node 0 has {key}={view.get(key)}"
                for key, value in message["view"].items() if value != view.get(key)]
    if not problems and node in joined:
        problems = [f"two nodes were started with NODE_RANK={node}"]
    elif not problems and not 0 < node < nnodes:
        problems = [f"node {node} has NODE_RANK={node}, outside 1 .. NNODES - 1 = {nnodes - 1}"]
    return problems


def _accept(server: socket.socket, until: float) -> tuple[socket.socket, dict] | None:
    """The next node's connection and its check-in line before ``until`` (None: none came)."""
    while (left := until - time.monotonic()) > 0:
        server.settimeout(min(left, 1.0))
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        message = _line(conn, _READ_S)
        if message and isinstance(message.get("node"), int) and isinstance(message.get("view"), dict):
            return conn, message
        conn.close()  # not one of ours (a port scan, a health probe)
    return None


def lead(port: int, nnodes: int, view: dict, deadline_s: float = DEADLINE_S, grace_s: float = GRACE_S) -> list[str]:
    """Node 0: wait for nodes 1 .. ``nnodes`` - 1 to check in; the reasons the job cannot start (empty: go)."""
    joined: dict[int, socket.socket] = {}
    told: set[int] = set()  # nodes already answered with a refusal
    problems: list[str] = []
    deadline = time.monotonic() + deadline_s
    with _listener(port) as server:
        while len(joined) < nnodes - 1 and not problems:
            arrival = _accept(server, deadline)
            if arrival is None:
                missing = [str(n) for n in range(1, nnodes) if n not in joined]
                problems.append(f"node{'s' if len(missing) > 1 else ''} {', '.join(missing)} of NNODES={nnodes} did "
                                f"not check in at MASTER_PORT={port} within {deadline_s:.0f} s")
                break
            conn, message = arrival
            problems = _judge(message, view, nnodes, joined)
            if problems:
                _send(conn, {"refused": problems})
                conn.close()
                told.add(message["node"])
            else:
                joined[message["node"]] = conn
        if problems:
            for conn in joined.values():
                _send(conn, {"refused": problems})
                conn.close()
        # A node whose check-in was still queued, or that was between retries, when the job was refused hears it
        # too rather than waiting out its deadline (nodes that never came are not waited for).
        grace = time.monotonic() + grace_s
        while problems and not set(range(1, nnodes)) <= told | set(joined) and time.monotonic() < deadline:
            arrival = _accept(server, min(grace, deadline))
            if arrival is None:
                break
            conn, message = arrival
            _send(conn, {"refused": problems})
            conn.close()
            told.add(message["node"])
    if not problems:  # the port is free before anyone is told to go: torchrun's store binds it next
        for conn in joined.values():
            _send(conn, {"go": True})
            conn.close()
    return problems


def follow(address: str, port: int, node: int, view: dict, deadline_s: float = DEADLINE_S) -> list[str]:
    """Node ``node`` > 0: check in with node 0 at ``address``:``port`` (retrying until it listens) and wait for its
    answer; the reasons the job cannot start (empty: go)."""
    deadline = time.monotonic() + deadline_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return [f"node 0 did not answer at MASTER_ADDR={address} MASTER_PORT={port} within {deadline_s:.0f} s"]
        try:
            conn = socket.create_connection((address, port), timeout=min(left, 5.0))
        except OSError:
            time.sleep(min(1.0, max(left, 0)))
            continue
        with conn:
            _send(conn, {"node": node, "view": view})
            answer = _line(conn, max(deadline - time.monotonic(), 0.1))
        if answer is None:  # node 0 restarted, or the line broke before it answered: check in again
            time.sleep(1.0)
            continue
        if answer.get("go") is True:
            return []
        return [str(line) for line in answer.get("refused", ["node 0 refused this node without a reason"])]


def check_in(cfg) -> list[str]:
    """This node's part (a ``ServerConfig`` with NNODES > 1): the reasons the job cannot start (empty: go)."""
    from triton_backend.ranks.agreement import fingerprint

    view = fingerprint(cfg)
    if cfg.node_rank == 0:
        return lead(cfg.master_port, cfg.nnodes, view)
    return follow(cfg.master_addr, cfg.master_port, cfg.node_rank, view)
