"""The rank protocol: rank 0 leads, ranks 1..N-1 follow, and every rank runs the same step function.

Each step is two broadcasts from rank 0 over the world group: a fixed header ``[command, batch, seq]`` and,
for STEP, one int64 payload with the token ids, positions, KV-cache slots and last-token indices (ids and
positions never travel as floats). Followers run ``CachedGPT.forward`` on exactly those tensors, so their
tensor-parallel collectives line up with rank 0's. Rank 0 validates a request fully before anything is
broadcast; followers only ever see well-formed steps. HEARTBEAT keeps idle followers inside the collective
timeout; SHUTDOWN ends them.

The broadcasts use a group of their own whose timeout is short (``COLLECTIVE_TIMEOUT_S``): a follower whose
leader went silent fails fast, while the world group keeps a long timeout for slow checkpoint loading.
"""

from __future__ import annotations

import datetime
import enum
import logging

import torch
import torch.distributed as dist

LOG = logging.getLogger(__name__)


class Command(enum.IntEnum):
    STEP = 1
    HEARTBEAT = 2
    SHUTDOWN = 3


def make_group(timeout_s: float):
    """The protocol's process group (every rank must call this, in the same order)."""
    return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))


class Leader:
    """Rank 0's side: ``forward`` broadcasts a step to the followers, then runs it locally."""

    def __init__(self, gpt, group=None):
        self.gpt = gpt
        self.group = group
        self.device = gpt.device
        self.followers = dist.get_world_size() - 1

    @property
    def max_len(self) -> int:
        return self.gpt.max_len

    @property
    def cache(self):
        return self.gpt.cache

    def _send(self, command: Command, batch: int = 0, seq: int = 0, payload: torch.Tensor | None = None) -> None:
        if not self.followers:
            return
        header = torch.tensor([command, batch, seq], dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0, group=self.group)
        if payload is not None:
            dist.broadcast(payload, src=0, group=self.group)

    def forward(self, tokens, positions, slots, last):
        b, s = tokens.shape
        payload = torch.cat([tokens.reshape(-1), positions.reshape(-1), slots, last]).to(torch.int64)
        self._send(Command.STEP, b, s, payload)
        return self.gpt.forward(tokens, positions, slots, last)

    def heartbeat(self) -> None:
        self._send(Command.HEARTBEAT)

    def shutdown(self) -> None:
        try:
            self._send(Command.SHUTDOWN)
        except Exception as err:  # followers already gone (e.g. killed by torchrun): nothing left to stop
            LOG.warning("could not tell followers to shut down: %s", err)


def follow(gpt, group=None) -> None:
    """A follower's whole life: execute rank 0's steps until SHUTDOWN (or a collective error, which raises)."""
    header = torch.empty(3, dtype=torch.int64, device=gpt.device)
    while True:
        dist.broadcast(header, src=0, group=group)
        command, b, s = (int(x) for x in header.tolist())
        if command == Command.SHUTDOWN:
            return
        if command == Command.HEARTBEAT:
            continue
        if command != Command.STEP:
            raise RuntimeError(f"unknown command {command} from rank 0")
        payload = torch.empty(2 * b * s + 2 * b, dtype=torch.int64, device=gpt.device)
        dist.broadcast(payload, src=0, group=group)
        tokens, positions, slots, last = payload.split([b * s, b * s, b, b])
        gpt.forward(tokens.view(b, s), positions.view(b, s), slots, last)
