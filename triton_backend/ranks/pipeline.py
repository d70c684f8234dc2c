"""Pipeline stages: rank 0 launches steps into the first stage, the last stage sends back only their outputs.

The job has TP x PP ranks, ordered as Megatron orders them (rank = TP rank + TP x stage). A step travels:

1. Rank 0 (stage 0, TP rank 0) broadcasts it to the other TP ranks of stage 0 over their group: a header
   ``[command, tokens, rows, sequences, new table entries, plan bytes]``, the int64 payload ``protocol.py``
   describes, and the plan (which logits rows are sampled or scored, for which sequences; pickled).
2. Every rank of stage s runs its layers, then sends header, payload, plan and its hidden states [tokens, h]
   to the rank with its TP rank in stage s + 1 (point to point, ``isend``: gloo on CPU, NCCL on GPU; Megatron's
   own p2p helpers assume CUDA). Hidden states are the same on every TP rank of a stage, so each TP rank
   feeds its own peer and no stage broadcasts.
3. The last stage makes the logits, and its TP rank 0 turns them into the step's outputs
   (``outputs.Mirror``: its copies of rank 0's samplers) and sends rank 0 only those: tokens, log-probs, the
   alternatives and scores asked for. The logits never leave the stage.

Mixture-of-experts tallies (tokens routed to each expert, ``/metrics``): rank 0 holds its own stage's. When they
are asked for, the next step goes as TALLY_STEP, on which each stage's TP rank 0 adds its routers' tallies to the
plan it passes on and the last stage returns them with the outputs; every HEARTBEAT (an idle rank 0's) carries
them back the same way.

Every stage runs the steps in the order rank 0 launched them, so the KV blocks rank 0 hands out are written
and read in that order on every stage, whatever is in flight. Rank 0 does not wait for a step's outputs to
launch the next (``launch`` and ``collect`` are separate): with ``microbatches`` groups of sequences in flight
every stage computes at once. HEARTBEAT and SHUTDOWN travel the same way; the last stage answers each HEARTBEAT,
so that an idle rank 0 learns within ``COLLECTIVE_TIMEOUT_S`` that a stage (a node) is gone or cut off.
Point-to-point messages use the protocol's group, whose timeout (``COLLECTIVE_TIMEOUT_S``) ends a rank whose
neighbour went silent; the error names that neighbour and its node (``protocol.RankLost``).
"""

from __future__ import annotations

import collections
import datetime
import logging
import pickle

import torch
import torch.distributed as dist

from triton_backend.engine.grammar import Grammars
from triton_backend.engine.outputs import Mirror, StepOutputs

from .protocol import Command, Fronting, lost, split

LOG = logging.getLogger(__name__)
HEADER = 6  # command, tokens, rows, sequences, new table entries, plan bytes


def make_stage_groups(tp: int, pp: int, timeout_s: float) -> list:
    """Each stage's TP group with the protocol's timeout (every rank must call this, in the same order); None
    where a stage has one rank."""
    timeout = datetime.timedelta(seconds=timeout_s)
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp)), timeout=timeout) for s in range(pp)]
    return groups if tp > 1 else [None] * pp


class _Sends:
    """Point-to-point sends in flight, each kept with its tensors until done."""

    def __init__(self, group):
        self.group = group
        self.works: collections.deque = collections.deque()

    def send(self, tensors: list[torch.Tensor], dst: int) -> None:
        try:
            while self.works and self.works[0][0].is_completed():
                self.works.popleft()[0].wait()  # raises if the send failed
            for t in tensors:
                self.works.append((dist.isend(t, dst, group=self.group), t, dst))
        except RuntimeError as err:  # gloo and NCCL raise RuntimeError (DistBackendError) for a lost peer
            raise lost(dst, err) from err

    def wait(self) -> None:
        while self.works:
            work, _, dst = self.works.popleft()
            try:
                work.wait()
            except RuntimeError as err:
                raise lost(dst, err) from err


def _recv(t: torch.Tensor, src: int, group) -> torch.Tensor:
    try:
        dist.recv(t, src, group=group)
    except RuntimeError as err:
        raise lost(src, err) from err
    return t


def _bytes(data: bytes, device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else \
        torch.empty(0, dtype=torch.uint8, device=device)


class PipelineLeader(Fronting):
    """Rank 0's side: ``launch`` a step (stage 0 runs here), ``collect`` the oldest step's outputs."""

    def __init__(self, gpt, tp: int, pp: int, microbatches: int, group, stage_group=None):
        super().__init__(gpt)
        self.tp, self.pp, self.microbatches = tp, pp, microbatches
        self.group, self.stage_group = group, stage_group
        self.next, self.last = tp, tp * (pp - 1)  # stage 1's and the last stage's TP rank 0
        self.sends = _Sends(group)
        self.mirrored: set[int] = set()  # sequences the last stage has a sampler for
        self.tallies: dict[int, list[int]] = {}  # the later stages' MoE tallies, as last carried back
        self.tallies_wanted = False  # the next step carries them back (TALLY_STEP)
        self.tallies_stale = False  # steps ran since they were last carried back

    def expert_tokens(self) -> dict[int, list[int]]:
        """Every stage's MoE tallies: this stage's now, the others' as of the last step or heartbeat that carried
        them (one asked for now comes back with the next step, or the next heartbeat, see ``Engine``)."""
        if self.gpt.arch.num_experts:
            self.tallies_wanted = True
        return {**self.gpt.expert_tokens(), **self.tallies}

    def _message(self, command: Command, sizes=(0, 0, 0, 0), payload=None, plan: bytes = b""):
        header = torch.tensor([command, *sizes, len(plan)], dtype=torch.int64, device=self.device)
        parts = [header] + ([payload, _bytes(plan, self.device)] if payload is not None else [])
        if self.stage_group is not None:
            try:
                for t in parts:
                    dist.broadcast(t, src=0, group=self.stage_group)
            except RuntimeError as err:
                raise lost(None, err) from err
        return parts

    def launch(self, step: list[torch.Tensor], scored: list, sampled: list, released: list[int],
               vocab_size: int, host=None) -> None:
        """Start ``step`` (the engine's eight int64 tensors, ``CachedGPT.step``'s) down the pipeline. ``scored``:
        (sequence id, ``outputs.Scored``); ``sampled``: (sequence id, sampler); ``released``: sequences retired
        since; ``host``: the step's host arrays (``CachedGPT.step``)."""
        new = {}
        for i, sampler in [(i, s.sampler) for i, s in scored] + sampled:
            if i not in self.mirrored:
                new[i] = sampler
                self.mirrored.add(i)
        self.mirrored.difference_update(released)
        plan = pickle.dumps({"new": new, "released": released, "vocab": vocab_size, "sampled": [i for i, _ in sampled],
                             "scored": [(i, s.at, s.count, s.first) for i, s in scored]})
        tokens, _, last, lengths, *_, entries = step
        command = Command.TALLY_STEP if self.tallies_wanted else Command.STEP
        self.tallies_wanted, self.tallies_stale = False, command == Command.STEP
        parts = self._message(command, (len(tokens), len(last), len(lengths), len(entries)),
                              torch.cat(step).to(torch.int64), plan)
        hidden = self.gpt.step(*step, host=host)
        self.sends.send(parts + [hidden], self.next)

    def collect(self) -> StepOutputs:
        """The outputs of the oldest step launched (they come back in launch order)."""
        size = _recv(torch.empty(1, dtype=torch.int64, device=self.device), self.last, self.group)
        data = _recv(torch.empty(int(size), dtype=torch.uint8, device=self.device), self.last, self.group)
        outputs = pickle.loads(data.cpu().numpy().tobytes())
        if outputs.tallies is not None:
            self.tallies.update(outputs.tallies)
        return outputs

    def heartbeat(self) -> None:
        """Through every stage and back (the last stage answers, with the stages' MoE tallies): raises
        ``RankLost`` for a silent one."""
        self.sends.send(self._message(Command.HEARTBEAT), self.next)
        size = _recv(torch.empty(1, dtype=torch.int64, device=self.device), self.last, self.group)
        data = _recv(torch.empty(int(size), dtype=torch.uint8, device=self.device), self.last, self.group)
        self.tallies.update(pickle.loads(data.cpu().numpy().tobytes()))
        self.tallies_stale = False

    def shutdown(self) -> None:
        try:
            self.sends.send(self._message(Command.SHUTDOWN), self.next)
            self.sends.wait()
        except Exception as err:  # followers already gone (e.g. killed by torchrun): nothing left to stop
            LOG.warning("could not tell the pipeline to shut down: %s", err)


def follow(gpt, tp: int, pp: int, group, stage_group=None, tokenizer=None) -> None:
    """A follower's whole life at PP > 1: run each step rank 0 launched on this rank's stage and pass it on,
    until SHUTDOWN (or a communication error, which raises). ``tokenizer``: a function that loads the serving
    tokenizer, which the last stage needs for the sequences with a guide (structured outputs)."""
    rank = dist.get_rank()
    stage, tp_rank = divmod(rank, tp)
    last = stage == pp - 1
    mirror = Mirror(0, Grammars(tokenizer)) if last and tp_rank == 0 else None
    sends = _Sends(group)
    device = gpt.device
    hidden_size, dtype = gpt.arch.hidden_size, next(gpt.model.parameters()).dtype

    def receive(t: torch.Tensor) -> torch.Tensor:
        if stage > 0:
            return _recv(t, rank - tp, group)
        try:
            dist.broadcast(t, src=0, group=stage_group)
        except RuntimeError as err:
            raise lost(0, err) from err
        return t

    def tallied(carried: torch.Tensor | None) -> bytes:
        """The MoE tallies the earlier stages sent (pickled), this stage's added."""
        tallies = pickle.loads(carried.cpu().numpy().tobytes()) if carried is not None and len(carried) else {}
        return pickle.dumps({**tallies, **gpt.expert_tokens()})

    while True:
        header = receive(torch.empty(HEADER, dtype=torch.int64, device=device))
        command, n, rows, sequences, entries, plan_bytes = (int(x) for x in header.tolist())
        if command not in (Command.STEP, Command.TALLY_STEP, Command.HEARTBEAT, Command.SHUTDOWN):
            raise RuntimeError(f"unknown command {command} from the previous stage")
        if command == Command.HEARTBEAT:  # TP rank 0's line carries the tallies (the header counts their bytes)
            carried = receive(torch.empty(plan_bytes, dtype=torch.uint8, device=device)) if plan_bytes else None
            if tp_rank == 0:
                data = tallied(carried)
                header = torch.tensor([command, 0, 0, 0, 0, len(data)], dtype=torch.int64, device=device)
            if not last:
                sends.send([header, _bytes(data, device)] if tp_rank == 0 else [header], rank + tp)
            elif mirror is not None:  # the answer rank 0 waits for
                sends.send([torch.tensor([len(data)], dtype=torch.int64, device=device), _bytes(data, device)], 0)
            continue
        if command == Command.SHUTDOWN:
            if not last:
                sends.send([header], rank + tp)
            sends.wait()
            return
        payload = receive(torch.empty(2 * n + rows + 4 * sequences + entries, dtype=torch.int64, device=device))
        plan = receive(torch.empty(plan_bytes, dtype=torch.uint8, device=device))
        hidden = receive(torch.empty(n, hidden_size, dtype=dtype, device=device)) if stage > 0 else None
        if mirror is not None:  # its guided rows' masks fill while the forward pass runs
            wanted = pickle.loads(plan.cpu().numpy().tobytes())
            mirror.vocab_size = wanted["vocab"]
            mirror.prepare(wanted)
        out = gpt.step(*split(payload, n, rows, sequences, entries), hidden=hidden)
        tally = command == Command.TALLY_STEP and tp_rank == 0
        if not last:
            if tally:  # this stage's tallies join the earlier ones in the plan it passes on
                passed = pickle.loads(plan.cpu().numpy().tobytes())
                passed["tallies"] = {**passed.get("tallies", {}), **gpt.expert_tokens()}
                plan = _bytes(pickle.dumps(passed), device)
                header = torch.tensor([command, n, rows, sequences, entries, len(plan)], dtype=torch.int64,
                                      device=device)
            sends.send([header, payload, plan, out], rank + tp)
        elif mirror is not None:
            outputs = mirror.run(out, wanted)
            if tally:
                outputs.tallies = {**wanted.get("tallies", {}), **gpt.expert_tokens()}
            data = pickle.dumps(outputs)
            sends.send([torch.tensor([len(data)], dtype=torch.int64, device=device), _bytes(data, device)], 0)
