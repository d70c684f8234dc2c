"""Which KV-cache block holds what: the free list, reference counts and the prefix cache (rank 0 only).

The cache is a pool of fixed-size blocks (``kv_cache.PagedKVCache``); a sequence holds a list of them, its
block table, and takes a new one each time it fills the last. Full blocks are also keyed by their tokens and
every token before them (a chained digest), so a later prompt that starts the same way takes those blocks
instead of computing them again. A block nobody holds any more keeps its key and stays findable until it is
needed for something else: free blocks are handed out first, then the least recently released keyed ones.

Pure bookkeeping, no tensors: only the engine thread calls it, and the block tables it produces travel with
each step (``protocol``), so followers never need a copy. Why our own and not a library's: vLLM's block
manager comes with its scheduler and workers, and Megatron-core 0.16's ``BlockAllocator`` keeps its ids on the
CUDA device and has no prefix cache (see docs/architecture.md).
"""

from __future__ import annotations

import collections
import hashlib
import heapq

import numpy as np


def block_keys(tokens: list[int], block_size: int, start_key: bytes = b"") -> list[bytes]:
    """Keys of the full blocks of ``tokens``, which follow the block keyed ``start_key`` (b"": none): each
    block's key digests its tokens and the key before it, so it stands for the whole prefix."""
    keys, key = [], start_key
    for b in range(len(tokens) // block_size):
        chunk = np.asarray(tokens[b * block_size:(b + 1) * block_size], dtype=np.int64).tobytes()
        key = hashlib.blake2b(key + chunk, digest_size=16).digest()
        keys.append(key)
    return keys


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens; with ``prefix_caching``, full blocks found by their key."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free = list(range(num_blocks))  # a heap: the lowest id first keeps the used ids compact
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._by_key: dict[bytes, int] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # keyed, unheld: LRU first
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found

    def available(self) -> int:
        """Blocks that can be taken now (free, or keyed but held by nobody)."""
        return len(self._free) + len(self._idle)

    def in_use(self) -> int:
        return self.num_blocks - self.available()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def match(self, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """The cached blocks a prompt can start from, and their keys. At least one token is always left to
        compute (its logits give the first new token), so a prompt that is all cached blocks gives up its last."""
        if not self.prefix_caching:
            return [], []
        usable = (len(tokens) - 1) // self.block_size
        blocks, keys = [], []
        for key in block_keys(tokens[: usable * self.block_size], self.block_size):
            block = self._by_key.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
        return blocks, keys

    def count_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.queried_tokens += prompt_tokens
        self.hit_tokens += hit_tokens

    def hold(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (a prompt's prefix hit)."""
        for b in blocks:
            if self._refs[b] == 0:  # keyed and unheld: idle
                del self._idle[b]
            self._refs[b] += 1

    def take(self, n: int) -> list[int]:
        """``n`` blocks of one's own (raises ``MemoryError`` when fewer are available: check ``available``)."""
        if n > self.available():
            raise MemoryError(f"{n} KV blocks wanted, {self.available()} available")
        out = []
        for _ in range(n):
            if self._free:
                b = heapq.heappop(self._free)
            else:  # evict the least recently released cached block
                b, _ = self._idle.popitem(last=False)
                del self._by_key[self._key_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each block; a block nobody holds is free again, or idle if it is keyed."""
        for b in reversed(blocks):  # the tail first: it goes before the prefix that leads to it when evicted
            self._refs[b] -= 1
            if self._refs[b] < 0:
                raise RuntimeError(f"KV block {b} released more often than taken")
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._idle[b] = None
                else:
                    heapq.heappush(self._free, b)

    def publish(self, block: int, key: bytes) -> None:
        """Make a full block findable by ``key`` (a block already holding the same key wins: no duplicates)."""
        if self.prefix_caching and key not in self._by_key and block not in self._key_of:
            self._by_key[key] = block
            self._key_of[block] = key

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
