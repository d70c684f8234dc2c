"""The block pool: free blocks lowest first, references, the prefix cache's keys, LRU eviction."""

import pytest

from triton_backend.cache.blocks import BlockPool, block_keys


def test_blocks_are_handed_out_lowest_first_and_come_back():
    pool = BlockPool(6, 4)
    a = pool.take(2)
    b = pool.take(3)
    assert (a, b, pool.available(), pool.in_use()) == ([0, 1], [2, 3, 4], 1, 5)
    pool.release(a)
    assert pool.take(1) == [0]
    with pytest.raises(MemoryError, match="3 KV blocks wanted, 2 available"):
        pool.take(3)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([5])


def test_a_block_key_stands_for_its_whole_prefix():
    one = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(one) == 2  # the partial third block has no key
    assert block_keys([9, 2, 3, 4, 5, 6, 7, 8], 4)[1] != one[1]  # same tokens, different prefix
    assert block_keys([5, 6, 7, 8], 4, start_key=one[0]) == one[1:]  # chained from the key before


def test_a_prompt_starts_from_the_cached_blocks_of_its_prefix():
    pool = BlockPool(8, 4)
    tokens = list(range(10, 22))  # 3 full blocks
    blocks = pool.take(3)
    for block, key in zip(blocks, block_keys(tokens, 4)):
        pool.publish(block, key)
    assert pool.match(tokens + [1, 2])[0] == blocks  # all three, and tokens left to compute
    assert pool.match(tokens)[0] == blocks[:2]  # exactly on a boundary: the last block is computed again
    assert pool.match(tokens[:4] + [0] * 8)[0] == blocks[:1]  # shares only the first block
    assert pool.match([0] + tokens)[0] == []
    assert BlockPool(8, 4, prefix_caching=False).match(tokens)[0] == []


def test_released_cached_blocks_stay_findable_until_evicted_least_recent_first():
    pool = BlockPool(4, 2)
    first, second = [1, 2, 3, 4, 5], [7, 8, 9, 9, 5]
    for tokens in (first, second):
        blocks = pool.take(2)
        for block, key in zip(blocks, block_keys(tokens, 2)):
            pool.publish(block, key)
        pool.release(blocks)
    assert pool.in_use() == 0 and pool.available() == 4
    assert pool.match(first)[0] == [0, 1] and pool.match(second)[0] == [2, 3]
    pool.hold([0, 1])  # the first prompt again: its blocks are held, not evictable
    assert pool.take(1) == [3]  # the least recently released: the second prompt's tail (released first)
    assert pool.match(second)[0] == [2]  # its head is still there
    assert pool.match(first)[0] == [0, 1]
    pool.release([0, 1])
    pool.take(3)
    assert pool.available() == 0 and pool.match(first)[0] == []


def test_the_same_prefix_published_twice_keeps_the_first_block():
    pool = BlockPool(4, 2)
    (key,) = block_keys([1, 2], 2)
    blocks = pool.take(2)
    pool.publish(0, key)
    pool.publish(1, key)  # computed twice at once: the second copy stays private
    assert pool.match([1, 2, 3])[0] == [0]
    pool.release(blocks)
    assert pool.take(2) == [1, 2]  # free blocks go before the keyed idle one
    assert pool.match([1, 2, 3])[0] == [0]
    assert pool.hit_rate() == 0.0
    pool.count_lookup(10, 4)
    assert pool.hit_rate() == 0.4
