"""What a step's logits become: sampled tokens, their log-probs and alternatives, and prompt positions' scores.

It runs where the logits are. Without pipeline stages that is rank 0, over the engine's own ``RowSampler``s;
with them it is the last stage (``ranks/pipeline.py``), over copies of the same samplers that follow the same
tokens (``Mirror``), so that only what the engine needs travels back to rank 0, never the logits.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from preprocessing.params import InvalidRequest
from triton_backend.transfer import upload

from .grammar import prefetch
from .sampling import RowSampler, alternatives, model_log_probs, sample

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Scored:
    """Prompt positions of one sequence whose log-probs a step computes: logits rows ``at`` .. ``at + count``,
    predicting prompt tokens ``first + 1`` .. ``first + count``."""

    sampler: RowSampler
    at: int
    count: int
    first: int


@dataclasses.dataclass
class StepOutputs:
    scores: list[tuple[list[float], list | None]]  # per ``Scored``: log-probs, and alternatives when asked
    tokens: list[int | None]  # per sampled row (None: its sampling failed, see ``errors``)
    logprobs: list[float | None]
    tops: list[tuple[list[int], list[float]] | None]  # alternatives, for the rows that ask
    errors: list[str | None]
    sampled_again: bool = False  # sampling the whole step failed and ran row by row
    tallies: dict | None = None  # pipeline stages after the first: their MoE routers' tallies, when asked for


def failure(err: BaseException) -> str:
    """The error a request gets when the engine failed it (a step, or its own sampling); a rule of its own that it
    broke on the way (its guide could not go on) reads as the client's error."""
    if isinstance(err, InvalidRequest):
        return str(err)
    return f"generation failed: {type(err).__name__}: {err}"


def compute(logits: torch.Tensor, scored: list[Scored], samplers: list[RowSampler], vocab_size: int) -> StepOutputs:
    """The step's outputs from its ``logits``: the ``scored`` rows first wherever they are, then one row per
    sampler, in order. Samplers are not advanced (``accept``): the caller does, once it keeps the token."""
    scores = []
    if scored:
        for s in scored:
            log_probs = model_log_probs(logits[s.at:s.at + s.count], vocab_size)
            targets = upload(torch.tensor(s.sampler.prompt[s.first + 1:s.first + 1 + s.count]), log_probs.device)
            top = s.sampler.params.top_log_probs
            scores.append((log_probs.gather(1, targets[:, None])[:, 0].tolist(),
                           alternatives(log_probs, [top] * s.count) if top else None))
        keep = torch.ones(logits.shape[0], dtype=torch.bool)
        for s in scored:
            keep[s.at:s.at + s.count] = False
        logits = logits[upload(keep, logits.device)]  # pragma: no mutate
    out = StepOutputs(scores, [None] * len(samplers), [None] * len(samplers), [None] * len(samplers),
                      [None] * len(samplers))
    if not samplers:
        return out
    asking = [i for i, s in enumerate(samplers) if s.params.top_log_probs]
    row_log_probs = {}
    if asking:  # no tensor work on the steps where no row asks (the common case)
        log_probs = model_log_probs(logits[asking], vocab_size)
        for j, (i, top) in enumerate(zip(asking, alternatives(log_probs, [samplers[i].params.top_log_probs
                                                                           for i in asking]))):
            out.tops[i] = top
            row_log_probs[i] = log_probs[j]
    try:
        tokens, logprobs = sample(logits, samplers, vocab_size)
        rows = range(len(samplers))
    except Exception:  # one request's parameters broke sampling: that request alone must fail
        LOG.exception("sampling a step failed; sampling its rows one by one")
        out.sampled_again = True
        rows, tokens, logprobs = [], [], []
        for i, sampler in enumerate(samplers):
            try:
                (token,), (logprob,) = sample(logits[i:i + 1], [sampler], vocab_size)
            except Exception as err:
                out.errors[i] = failure(err)
            else:
                rows.append(i)
                tokens.append(token)
                logprobs.append(logprob)
    for i, token, logprob in zip(rows, tokens, logprobs):
        out.tokens[i] = token
        # with the row's log-probs: its token's is read from them, so that it equals its own alternative's
        # (``sample`` computes it another way, equal only to rounding)
        out.logprobs[i] = row_log_probs[i][token].item() if i in row_log_probs else logprob
    return out


class Mirror:
    """The last pipeline stage's copies of rank 0's samplers, by sequence id: made from the sampler rank 0 sends
    with a sequence's first step, advanced by the tokens they sample, dropped when rank 0 releases them."""

    def __init__(self, vocab_size: int, grammars=None):
        self.vocab_size = vocab_size
        self.grammars = grammars  # compiles the guides of the samplers it receives (``grammar.Grammars``)
        self.samplers: dict[int, RowSampler] = {}

    def prepare(self, plan: dict) -> None:
        """Before the stage's forward pass: take the step's new samplers, and start filling the masks of its
        guided rows while the pass runs."""
        self.samplers.update(plan["new"])
        for sampler in plan["new"].values():
            if sampler.guide is not None:
                self.grammars.rebuild(sampler.guide, sampler.generated)
        guides = [self.samplers[i].guide for i in plan["sampled"] if self.samplers[i].guide is not None]
        prefetch(guides, self.vocab_size)

    def run(self, logits: torch.Tensor, plan: dict) -> StepOutputs:
        """``plan``: ``new`` {id: sampler}, ``released`` [ids], ``scored`` [(id, at, count, first)], ``sampled``
        [ids] (see ``pipeline.wire_plan``), after ``prepare``."""
        scored = [Scored(self.samplers[i], at, count, first) for i, at, count, first in plan["scored"]]
        samplers = [self.samplers[i] for i in plan["sampled"]]
        out = compute(logits, scored, samplers, self.vocab_size)
        for sampler, token in zip(samplers, out.tokens):
            if token is not None and token != sampler.end_id:
                sampler.accept(token)  # as rank 0 does (a token it ends the sequence on is never needed)
        for i in plan["released"]:
            self.samplers.pop(i, None)
        return out
