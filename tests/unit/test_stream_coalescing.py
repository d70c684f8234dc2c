"""The streaming callable over a real engine, without Triton: what coalescing holds back and what it never does."""

import asyncio

import numpy as np
import pytest
import torch

from triton_backend.architecture import GPTArchitecture
from triton_backend.binding import coalesce_wait_s, make_stream_infer
from triton_backend.engine import Engine
from triton_backend.gpt import CachedGPT, build_model, init_parallel

ARCH = GPTArchitecture(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                       padded_vocab_size=512, max_position_embeddings=128, seq_length=128)


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    init_parallel(1, "cpu")
    torch.manual_seed(0)
    gpt = CachedGPT(build_model(ARCH).eval(), ARCH, max_slots=8)
    eng = Engine(gpt, tiny_tokenizer.vocab_size, tiny_tokenizer.eos_id, tokenizer=tiny_tokenizer).start()
    yield eng
    eng.stop()


def request(tokenizer, seed: int, max_tokens: int) -> dict:
    """One row as PyTriton hands it to the callable."""
    ids = tokenizer.encode("the quick brown fox")
    return {"INPUT_IDS": np.array([ids], np.int32), "INPUT_LENGTH": np.array([[len(ids)]], np.int32),
            "MAX_TOKENS": np.array([[max_tokens]], np.int32), "TEMPERATURE": np.array([[1.0]], np.float32),
            "SEED": np.array([[seed]], np.uint64), "END_ID": np.array([[-1]], np.int32)}


def run_streams(engine, tokenizer, n: int, responses_per_s: float, max_tokens: int = 48):
    """Every stream's responses (OUTPUT_IDS rows and TEXT_DELTA), ``n`` streams at once."""
    infer = make_stream_infer(engine, None, responses_per_s)

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


def test_held_tokens_all_arrive_in_order_and_the_first_and_last_are_not_held(engine, tiny_tokenizer):
    # 4 streams sharing 40 responses/s: each waits 0.1 s after sending, several steps of this engine.
    coalesced = run_streams(engine, tiny_tokenizer, 4, responses_per_s=40)
    every_token = run_streams(engine, tiny_tokenizer, 4, responses_per_s=0)
    for held, sent in zip(coalesced, every_token):
        assert [t for ids, _, _ in held for t in ids] == [t for ids, _, _ in sent for t in ids]  # same seed
        assert "".join(text for _, text, _ in held) == "".join(text for _, text, _ in sent)
        assert len(held[0][0]) == 1  # the first token went out alone, at once
        assert held[-1][2] == "length" and all(reason == "" for _, _, reason in held[:-1])
        assert len(held) < len(sent) / 2  # tokens were held and sent together
    assert all(len(ids) <= 1 for stream in every_token for ids, _, _ in stream)
