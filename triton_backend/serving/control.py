"""The route a client's cancellation takes to the engine, and the engine's load back to Triton's metrics.

PyTriton 0.7 never tells its callables that a client cancelled, and Triton's ensemble does not pass the
cancellation to a composing request already in flight. It does mark the *next* step's request: every streamed
response of a cancelled ``ensemble_stream`` reaches ``postprocessing`` as a cancelled request (postprocessing
has no dynamic batcher, which would drop it unseen). Each streamed response carries its generation's
``CANCEL_KEY``, so postprocessing sends ``cancel <key>`` to rank 0, which retires the generation before its
next step. Postprocessing also asks for the engine's ``load`` twice a second for the gauges, so that they are
current even when no response flows.

Unix datagrams on a socket rank 0 binds, rather than another model: the messages are tiny, one-way and
local, and the route must work while every model instance is busy. Plain Python, testable without Triton.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import tempfile
import threading

LOG = logging.getLogger(__name__)
ENV = "MEGATRON_TRITON_CONTROL"  # the socket's path, set by rank 0 for the Triton process and its models


def default_path() -> pathlib.Path:
    return pathlib.Path(tempfile.gettempdir()) / f"megatron_triton_{os.getpid()}.sock"  # short: 108-byte limit


class ControlChannel:
    """Rank 0's end: a thread serving ``cancel <key>`` and ``load`` datagrams for ``engine``."""

    def __init__(self, path: pathlib.Path, engine):
        self.path, self.engine = pathlib.Path(path), engine
        self._live: dict[str, object] = {}  # cancel key -> Generation
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.path.unlink(missing_ok=True)
        self._sock.bind(str(self.path))
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def register(self, key: str, generation) -> None:
        with self._lock:
            self._live[key] = generation

    def unregister(self, key: str) -> None:
        with self._lock:
            self._live.pop(key, None)

    def cancel(self, key: str) -> bool:
        with self._lock:
            generation = self._live.pop(key, None)
        if generation is not None:
            self.engine.cancel(generation)
        return generation is not None

    def _serve(self) -> None:
        while True:
            try:
                message, sender = self._sock.recvfrom(4096)
            except OSError:  # closed
                return
            try:
                command, _, arg = message.decode().partition(" ")
                if command == "cancel":
                    if self.cancel(arg):
                        LOG.info("cancelled by the client: %s", arg)
                elif command == "load" and sender:
                    self._sock.sendto(json.dumps(self.engine.load()).encode(), sender)
                elif command == "experts" and sender:
                    self._sock.sendto(json.dumps(self.engine.expert_tokens()).encode(), sender)
            except (OSError, UnicodeDecodeError) as err:  # a peer that went away must not end the channel
                LOG.warning("control message %r: %s", message[:64], err)

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)


class ControlClient:
    """The Triton side (postprocessing): cancel a generation, ask for the engine's load."""

    def __init__(self, path: str | os.PathLike | None = None, timeout_s: float = 0.2):
        self.path = str(path or os.environ.get(ENV, ""))
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # An address of its own, so that rank 0 can answer ``load``; in Linux's abstract namespace, so that a
        # killed backend stub leaves no socket file behind.
        self._sock.bind(f"\0megatron_triton_peer_{os.getpid()}_{id(self)}")
        self._timeout_s = timeout_s
        self._lock = threading.Lock()

    def cancel(self, key: str) -> None:
        self._send(f"cancel {key}".encode())

    def load(self) -> dict | None:
        """The engine's load, or None when rank 0 does not answer in time."""
        return self._ask(b"load")

    def expert_tokens(self) -> dict[str, list[int]] | None:
        """Tokens routed to each expert so far, by MoE layer number (a string in JSON); None: no answer."""
        return self._ask(b"experts")

    def _ask(self, question: bytes, size: int = 1 << 20) -> dict | None:
        with self._lock:
            self._sock.setblocking(False)
            try:
                while True:  # drop a late answer to an earlier question
                    self._sock.recv(size)
            except OSError:
                pass
            self._sock.settimeout(self._timeout_s)
            if not self._send(question):
                return None
            try:
                return json.loads(self._sock.recv(size))
            except (OSError, ValueError):
                return None

    def _send(self, message: bytes) -> bool:
        if not self.path:
            return False
        try:
            self._sock.sendto(message, self.path)
            return True
        except OSError as err:  # rank 0 not listening (yet, or any more)
            LOG.debug("control socket %s: %s", self.path, err)
            return False

    def close(self) -> None:
        self._sock.close()
