"""The streaming callable over a real engine, without Triton: what coalescing holds back and what it never does.

Coalescing is timed by a clock that counts engine steps here (``StepClock``), so what is held back does not depend
on how fast this machine runs the model.
"""

import asyncio
import time

import numpy as np
import pytest

from triton_backend.engine.engine import Engine
from triton_backend.model.architecture import GPTArchitecture
from triton_backend.model.gpt import CachedGPT
from triton_backend.serving.binding import coalesce_wait_s, make_stream_infer

from .models import context_model

ARCH = GPTArchitecture(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                       padded_vocab_size=512, max_position_embeddings=128, seq_length=128)


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    gpt = CachedGPT(context_model(ARCH), ARCH, max_slots=8)
    eng = Engine(gpt, tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id, tokenizer=tiny_tokenizer).start()
    yield eng
    eng.stop()


def request(tokenizer, seed: int, max_tokens: int) -> dict:
    """One row as PyTriton hands it to the callable."""
    ids = tokenizer.encode("the quick brown fox")
    return {"INPUT_IDS": np.array([ids], np.int32), "INPUT_LENGTH": np.array([[len(ids)]], np.int32),
            "MAX_TOKENS": np.array([[max_tokens]], np.int32), "TEMPERATURE": np.array([[1.0]], np.float32),
            "SEED": np.array([[seed]], np.uint64), "END_ID": np.array([[-1]], np.int32)}


class StepClock:
    """A clock for the coalescer that moves ``tick`` seconds per engine step (0: it stands still)."""

    def __init__(self, engine, tick: float):
        self.now, self.tick = 0.0, tick
        engine.add_step_hook(self.step)

    def step(self):
        self.now += self.tick

    def __call__(self) -> float:
        return self.now


def run_streams(engine, tokenizer, n: int, responses_per_s: float, max_tokens: int = 48, clock=time.monotonic):
    """Every stream's responses (OUTPUT_IDS rows and TEXT_DELTA), ``n`` streams at once."""
    infer = make_stream_infer(engine, None, responses_per_s, clock)

    async def one(seed):
        out = []
        async for response in infer([request(tokenizer, seed, max_tokens)]):
            r = response[0]
            new = int(r["OUTPUT_LENGTH"][0][0]) - sum(len(ids) for ids, _, _ in out)
            out.append((r["OUTPUT_IDS"][0][:new].tolist(), r["TEXT_DELTA"][0][0].decode(),
                        r["FINISH_REASON"][0][0].decode()))
        return out

    async def all_streams():  # a held-back end would leave a stream waiting for ever
        return await asyncio.wait_for(asyncio.gather(*[one(seed) for seed in range(n)]), 60)

    return asyncio.run(all_streams())


def test_the_wait_grows_with_live_streams_and_is_capped():
    assert coalesce_wait_s(2, 200) == 0.0  # one or two streams: every token at once
    assert coalesce_wait_s(16, 200) == pytest.approx(0.08)
    assert coalesce_wait_s(1000, 200) == 0.5
    assert coalesce_wait_s(16, 0) == 0.0  # coalescing off


def test_held_tokens_all_arrive_in_order_and_the_end_is_not_held(engine, tiny_tokenizer):
    # 4 streams sharing 40 responses/s: each holds 0.1 s after sending, 10 steps of this clock (0.01 s a step).
    coalesced = run_streams(engine, tiny_tokenizer, 4, responses_per_s=40, clock=StepClock(engine, 0.01))
    every_token = run_streams(engine, tiny_tokenizer, 4, responses_per_s=0)
    for held, sent in zip(coalesced, every_token):
        assert [t for ids, _, _ in held for t in ids] == [t for ids, _, _ in sent for t in ids]  # same seed
        assert "".join(text for _, text, _ in held) == "".join(text for _, text, _ in sent)
        assert held[-1][2] == "length" and all(reason == "" for _, _, reason in held[:-1])
        # 48 tokens, a response at most every 10 steps after the first; a late event loop only merges more.
        assert len(held) <= 2 + 48 // 10


def test_a_stream_whose_hold_never_ends_gets_its_first_token_and_its_end(engine, tiny_tokenizer):
    """With the clock standing still, nothing after the first response is ever due: only the first token (sent
    before any hold) and the end (never held) can go out, so the stream gets two responses, or three when tokens
    reached its event loop between the first response and the hold."""
    streams = run_streams(engine, tiny_tokenizer, 4, responses_per_s=40, clock=StepClock(engine, 0.0))
    for responses in streams:
        assert 2 <= len(responses) <= 3
        assert sum(len(ids) for ids, _, _ in responses) == 48 and responses[-1][2] == "length"
