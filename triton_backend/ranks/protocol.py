"""The rank protocol: rank 0 leads, ranks 1..N-1 follow, and every rank runs the same step function.

Each step is two broadcasts from rank 0 over the world group: a fixed header ``[command, tokens, rows,
sequences, table entries]`` and, for STEP, one int64 payload with the packed token ids and positions, the
indices of the tokens whose logits are wanted, each sequence's token count, and its KV block table as an edit
of the one every rank keeps for it (its slot, the entries kept, the length now, and the new entries, all the
sequences' together: ``cache/tables.py``); ids and positions never travel as floats. Rank 0's engine alone
decides which blocks hold what; the edits it sends make every rank write and read the same places. Followers
run ``CachedGPT.step`` on exactly those tensors, so their tensor-parallel collectives line up with rank 0's.
Rank 0 validates a request fully before anything is broadcast; followers only ever see well-formed steps.
HEARTBEAT keeps idle followers inside the collective timeout; SHUTDOWN ends them.

The broadcasts use a group of their own whose timeout is short (``COLLECTIVE_TIMEOUT_S``): a follower whose
leader went silent fails fast, while the world group keeps a long timeout for slow checkpoint loading.
"""

from __future__ import annotations

import datetime
import enum
import logging
import os

import torch
import torch.distributed as dist

LOG = logging.getLogger(__name__)


class RankLost(RuntimeError):
    """A rank this one exchanges steps with is gone or cut off (the message names it and its node)."""


def describe(rank: int) -> str:
    """``rank R (node N)``: torchrun gives each node LOCAL_WORLD_SIZE consecutive ranks."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or dist.get_world_size())
    return f"rank {rank} (node {rank // per_node})"


def lost(rank: int | None, err: BaseException) -> RankLost:
    who = describe(rank) if rank is not None else "a follower"
    return RankLost(f"{who} is lost: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


class Command(enum.IntEnum):
    STEP = 1
    HEARTBEAT = 2
    SHUTDOWN = 3
    TALLY_STEP = 4  # pipeline stages only: a STEP whose outputs carry every stage's MoE expert tallies back


def make_group(timeout_s: float):
    """The protocol's process group (every rank must call this, in the same order)."""
    return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))


class Fronting:
    """Rank 0's own ``CachedGPT`` behind a leader: the sizes the engine reads pass through to it."""

    def __init__(self, gpt):
        self.gpt = gpt
        self.device = gpt.device

    @property
    def max_len(self) -> int:
        return self.gpt.max_len

    @property
    def cache(self):
        return self.gpt.cache

    @property
    def max_slots(self) -> int:
        return self.gpt.max_slots

    @property
    def arch(self):
        return self.gpt.arch

    def expert_tokens(self) -> dict[int, list[int]]:
        return self.gpt.expert_tokens()


class Leader(Fronting):
    """Rank 0's side: ``step`` broadcasts a step to the followers, then runs it locally."""

    def __init__(self, gpt, group=None):
        super().__init__(gpt)
        self.group = group
        self.followers = dist.get_world_size() - 1

    def _send(self, command: Command, sizes: tuple[int, ...] = (0, 0, 0, 0), payload: torch.Tensor | None = None):
        if not self.followers:
            return
        header = torch.tensor([command, *sizes], dtype=torch.int64, device=self.device)
        try:
            dist.broadcast(header, src=0, group=self.group)
            if payload is not None:
                dist.broadcast(payload, src=0, group=self.group)
        except RuntimeError as err:  # gloo and NCCL raise RuntimeError (DistBackendError) for a lost peer
            raise lost(None, err) from err

    def step(self, tokens, positions, last, lengths, slots, keeps, table_lengths, entries, host=None):
        """Broadcast the step (``CachedGPT.step``'s eight tensors), then run it here."""
        step = (tokens, positions, last, lengths, slots, keeps, table_lengths, entries)
        payload = torch.cat(step).to(torch.int64)
        self._send(Command.STEP, (len(tokens), len(last), len(lengths), len(entries)), payload)
        return self.gpt.step(*step, host=host)

    def heartbeat(self) -> None:
        self._send(Command.HEARTBEAT)

    def shutdown(self) -> None:
        try:
            self._send(Command.SHUTDOWN)
        except Exception as err:  # followers already gone (e.g. killed by torchrun): nothing left to stop
            LOG.warning("could not tell followers to shut down: %s", err)


def follow(gpt, group=None) -> None:
    """A follower's whole life: execute rank 0's steps until SHUTDOWN (or a collective error, which raises)."""
    header = torch.empty(5, dtype=torch.int64, device=gpt.device)

    def receive(t: torch.Tensor) -> None:
        try:
            dist.broadcast(t, src=0, group=group)
        except RuntimeError as err:
            raise lost(0, err) from err

    while True:
        receive(header)
        command, n, rows, sequences, entries = (int(x) for x in header.tolist())
        if command == Command.SHUTDOWN:
            return
        if command == Command.HEARTBEAT:
            continue
        if command != Command.STEP:
            raise RuntimeError(f"unknown command {command} from rank 0")
        payload = torch.empty(2 * n + rows + 4 * sequences + entries, dtype=torch.int64, device=gpt.device)
        receive(payload)
        gpt.step(*split(payload, n, rows, sequences, entries))


def split(payload: torch.Tensor, n: int, rows: int, sequences: int, entries: int) -> list[torch.Tensor]:
    """A STEP payload as ``CachedGPT.step``'s eight tensors."""
    return list(payload.split([n, n, rows, sequences, sequences, sequences, sequences, entries]))
