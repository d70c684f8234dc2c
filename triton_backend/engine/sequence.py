"""A request the engine has admitted: its tokens, its KV blocks, and how much of it the cache holds."""

from __future__ import annotations

import dataclasses
import itertools

from triton_backend.cache.blocks import BlockPool, block_keys

from .generation import Generation
from .sampling import RowSampler

_ids = itertools.count()


@dataclasses.dataclass(eq=False)  # a sequence is itself: found in the engine's lists by identity
class Sequence:
    generation: Generation
    sampler: RowSampler
    id: int = dataclasses.field(default_factory=lambda: next(_ids))  # names it to a pipeline's last stage
    group: int = 0  # the batch it runs in while several are in flight (pipeline stages)
    in_flight: bool = False  # a step that runs it was launched and its outputs are not back yet
    blocks: list[int] = dataclasses.field(default_factory=list)  # its block table
    slot: int = -1  # its row of the ranks' block tables while it runs (``cache/tables.py``)
    tabled: int = 0  # entries of its block table the ranks hold in that row
    computed: int = 0  # tokens (prompt, then generated) whose keys and values are in the cache
    published: int = 0  # full blocks made findable by their prefix (``BlockPool.publish``)
    last_key: bytes = b""  # the key of block ``published - 1``

    def tokens(self, start: int = 0, end: int | None = None) -> list[int]:
        """What the cache must hold before the next token (the prompt and every token generated so far), from
        ``start`` to ``end``, without copying the rest."""
        prompt, generated = self.generation.prompt, self.sampler.generated
        end = len(prompt) + len(generated) if end is None else end
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return generated[start - len(prompt):end - len(prompt)]
        return prompt[start:] + generated[:end - len(prompt)]

    def pending(self) -> int:
        """Tokens to run before the next one can be sampled (1 for a decoding sequence)."""
        return len(self.generation.prompt) + len(self.sampler.generated) - self.computed

    def scoring(self) -> bool:
        """Whether prompt positions remain whose log-probs it must compute (so none may come from the cache)."""
        g = self.generation
        return g.params.return_prompt_log_probs and len(g.prompt_logprobs) < len(g.prompt) - 1

    def start_from_cache(self, pool: BlockPool) -> None:
        """Take the cached blocks its tokens start with (none without prefix caching, none while scoring)."""
        if self.scoring():
            return
        blocks, keys = pool.match(self.tokens())
        pool.hold(blocks)
        self.blocks, self.computed, self.published = blocks, len(blocks) * pool.block_size, len(blocks)
        self.last_key = keys[-1] if keys else b""

    def grow(self, pool: BlockPool, n: int, reserve: int = 0) -> int:
        """Blocks for up to ``n`` more tokens; returns how many it got room for (maybe 0). With ``reserve``, blocks
        for that many tokens in all or none (the slot layout's whole context)."""
        if reserve:
            missing = pool.blocks_for(reserve) - len(self.blocks)
            if missing > pool.available():
                return 0
            self.blocks += pool.take(max(missing, 0))
            return n
        room = len(self.blocks) * pool.block_size - self.computed + pool.available() * pool.block_size
        n = min(n, room)
        if n > 0:
            self.blocks += pool.take(pool.blocks_for(self.computed + n) - len(self.blocks))
        return max(n, 0)

    def publish(self, pool: BlockPool) -> None:
        """Make its newly filled blocks findable by the tokens that lead to them."""
        full = self.computed // pool.block_size
        if full > self.published and pool.prefix_caching:
            size = pool.block_size
            keys = block_keys(self.tokens(self.published * size, full * size), size, self.last_key)
            for block, key in zip(self.blocks[self.published:full], keys):
                pool.publish(block, key)
            self.last_key = keys[-1]
        self.published = full

    def release(self, pool: BlockPool) -> None:
        """Give its blocks back (its full ones stay findable) and start again from nothing."""
        pool.release(self.blocks)
        self.blocks, self.computed, self.published, self.last_key, self.tabled = [], 0, 0, b"", 0
