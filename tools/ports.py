"""Free loopback ports for servers that tests and benchmarks start."""

from __future__ import annotations

import pathlib
import random
import socket


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now, below the kernel's ephemeral range.

    A port from ``bind(0)`` is an ephemeral one: between this check and tritonserver's bind (half a minute at
    TP=4) any outgoing connection (gloo, torchrun's store, clients) may take it as its source port, and Triton
    then fails to start. Ports below the range are only taken by a listener that asks for them.
    """
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        port = rng.randrange(10000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports
