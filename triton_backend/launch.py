"""Start this node's part of the job: ``python -m triton_backend.launch`` (what ``make serve`` and the image run).

One node: ``torchrun --standalone`` with TP x PP ranks. Several: the same command on every node with ``NNODES``,
``NODE_RANK`` and ``MASTER_ADDR`` (``MASTER_PORT``), a static rendezvous in which node i holds ranks
i x (TP x PP / NNODES) onwards, so node 0 holds rank 0, the engine and the serving process.

torch.distributed picks its network interface from the host name, which on a multi-homed machine (a pod, a
container, a network namespace) often names another network or none. Unless ``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME`` say otherwise, the interface through which this node reaches ``MASTER_ADDR`` is used.
Before torchrun, each node checks in with node 0 (``ranks/handshake.py``): a node with another configuration is
refused on every node, where torchrun's rendezvous would wait. A checkpoint that cannot be served at the asked
TP / PP / EP is refused here too, by the same rule the ranks apply, before TP x PP processes start to find it out.
"""

from __future__ import annotations

import os
import pathlib
import socket
import sys

import psutil

from triton_backend.config import ServerConfig
from triton_backend.ranks import handshake


def interface_to(address: str, port: int = 29500) -> str | None:
    """The name of the interface this machine's route to ``address`` leaves by (a UDP "connection" sends no
    packet: it only asks the kernel for the route and its source address)."""
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((address, port))
            source = probe.getsockname()[0]
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == source for a in addresses):
            return name
    return None


def torchrun_command(cfg: ServerConfig, module: str = "triton_backend.server") -> list[str]:
    torchrun = str(pathlib.Path(sys.executable).parent / "torchrun")
    per_node = str(cfg.ranks_per_node)
    if cfg.nnodes == 1:
        return [torchrun, "--standalone", "--nproc-per-node", per_node, "-m", module]
    return [torchrun, "--nnodes", str(cfg.nnodes), "--node-rank", str(cfg.node_rank), "--master-addr",
            cfg.master_addr, "--master-port", str(cfg.master_port), "--nproc-per-node", per_node, "-m", module]


def layout_problem(cfg: ServerConfig) -> str | None:
    """Why the checkpoint cannot be served in this layout (None: it can, or the ranks will say what is wrong)."""
    from triton_backend import checkpoints

    try:
        checkpoints.read_architecture(cfg.checkpoint, cfg.tensor_parallel, cfg.pipeline_parallel, cfg.pp_layers,
                                      cfg.experts_split)
    except checkpoints.CheckpointError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - anything else (a file being written, a format read only by the ranks) is theirs
        return None
    return None


def main() -> int:
    try:
        cfg = ServerConfig.from_env()
    except ValueError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    if cfg.nnodes > 1:
        if "GLOO_SOCKET_IFNAME" not in os.environ or "NCCL_SOCKET_IFNAME" not in os.environ:
            name = interface_to(cfg.master_addr, cfg.master_port)
            if name is None:
                print(f"configuration error: no route to MASTER_ADDR={cfg.master_addr} from node {cfg.node_rank}",
                      file=sys.stderr)
                return 2
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
        print(f"node {cfg.node_rank} of {cfg.nnodes}: {cfg.ranks_per_node} ranks, rendezvous at "
              f"{cfg.master_addr}:{cfg.master_port} over {os.environ['GLOO_SOCKET_IFNAME']}", file=sys.stderr,
              flush=True)
        problems = handshake.check_in(cfg)  # every node agrees before torchrun, or none starts it
        for line in problems:
            print(f"configuration error: {line}", file=sys.stderr)
        if problems:
            return 2
    # After the check-in: the nodes agree on the layout and the checkpoint, so each refuses a layout that does not
    # fit by itself, and none is left waiting for another.
    problem = layout_problem(cfg)
    if problem:
        print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    command = torchrun_command(cfg)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
