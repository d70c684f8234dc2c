"""A running request's cache state (``Sequence``) against the block pool, rule by rule."""

import torch

from preprocessing.params import SamplingParams
from triton_backend.cache.blocks import BlockPool, block_keys
from triton_backend.cache.kv_cache import PagedKVCache
from triton_backend.engine.generation import new_generation
from triton_backend.engine.sampling import RowSampler
from triton_backend.engine.sequence import Sequence

PROMPT = list(range(10, 20))  # 10 tokens: 2 full blocks of 4 and 2 more


def sequence(generated=(), prompt=PROMPT) -> Sequence:
    params = SamplingParams(max_tokens=20)
    seq = Sequence(new_generation(prompt, params, None), RowSampler(params, prompt, 2, 0))
    seq.sampler.generated = list(generated)
    return seq


def test_tokens_slice_the_prompt_and_what_was_generated_without_joining_them():
    seq = sequence([90, 91, 92])
    assert seq.tokens() == PROMPT + [90, 91, 92]
    assert seq.tokens(2, 5) == PROMPT[2:5]
    assert seq.tokens(0, 10) == PROMPT  # ends exactly where the prompt does
    assert seq.tokens(10, 12) == [90, 91]  # starts exactly where the prompt ends
    assert seq.tokens(8, 12) == PROMPT[8:] + [90, 91]
    assert seq.tokens(11) == [91, 92]
    assert seq.pending() == 13
    seq.computed = 12
    assert seq.pending() == 1


def test_growing_takes_blocks_as_tokens_need_them_and_no_more_than_there_are():
    pool = BlockPool(4, 4)
    seq = sequence()
    assert seq.grow(pool, 5) == 5 and seq.blocks == [0, 1]
    seq.computed = 5
    assert seq.grow(pool, 3) == 3 and seq.blocks == [0, 1]  # fits in the second block
    assert seq.grow(pool, 4) == 4 and seq.blocks == [0, 1, 2]
    assert seq.grow(pool, 100) == 11 and seq.blocks == [0, 1, 2, 3]  # 7 places left in its blocks, 4 in the last
    assert seq.grow(pool, 0) == 0 and pool.available() == 0


def test_reserving_takes_the_whole_context_at_once_or_nothing():
    pool = BlockPool(5, 4)
    seq = sequence()
    assert seq.grow(pool, 3, reserve=16) == 3 and seq.blocks == [0, 1, 2, 3]
    assert seq.grow(pool, 1, reserve=16) == 1 and len(seq.blocks) == 4  # already holds it
    other = sequence()
    assert other.grow(pool, 1, reserve=16) == 0 and other.blocks == [] and pool.available() == 1
    exact = BlockPool(4, 4)  # exactly one context's blocks: taken
    assert sequence().grow(exact, 1, reserve=16) == 1 and exact.available() == 0


def test_publishing_over_several_steps_chains_the_keys_as_one_pass_would():
    pool = BlockPool(8, 4)
    seq = sequence([90, 91, 92, 93, 94, 95])  # 16 tokens: 4 full blocks
    seq.grow(pool, 16)
    for computed in (6, 9, 16):  # blocks fill in uneven steps
        seq.computed = computed
        seq.publish(pool)
    keys = block_keys(seq.tokens(), 4)
    assert seq.published == 4 and seq.last_key == keys[-1]
    assert pool.match(seq.tokens() + [7])[0] == seq.blocks  # every block found by the whole prefix's keys


def test_starting_from_the_cache_takes_the_longest_cached_prefix_generated_tokens_too():
    pool = BlockPool(8, 4)
    first = sequence([90, 91, 92, 93, 94, 95])
    first.grow(pool, 16)
    first.computed = 16
    first.publish(pool)
    first.release(pool)
    assert (first.blocks, first.computed, first.published, first.last_key) == ([], 0, 0, b"")
    assert pool.in_use() == 0
    resumed = sequence([90, 91, 92, 93, 94, 95, 96])  # a preempted sequence read again, one token further
    resumed.start_from_cache(pool)
    assert resumed.blocks == [0, 1, 2, 3] and resumed.computed == 16 and resumed.published == 4
    assert resumed.last_key == block_keys(resumed.tokens(), 4)[3] and resumed.pending() == 1
    assert pool.in_use() == 4
    fresh = sequence(prompt=PROMPT[:4] + [0] * 6)
    fresh.start_from_cache(pool)
    assert (fresh.blocks, fresh.computed, fresh.last_key) == ([0], 4, block_keys(PROMPT[:4], 4)[0])
    off = BlockPool(8, 4, prefix_caching=False)
    seq = sequence()
    seq.grow(off, 10)
    seq.computed = 10
    seq.publish(off)
    assert seq.published == 2 and off.match(PROMPT)[0] == []


def test_the_cache_keeps_its_dtype():
    half = PagedKVCache(2, 3, 4, 1, 2, torch.bfloat16, "cpu")
    assert {t.dtype for t in half.keys + half.values} == {torch.bfloat16}
    assert half.nbytes() == 2 * 2 * 3 * 4 * 2 * 2
