"""FlexAttention over the paged cache (``model/flex_paged.py``), the CUDA path's attention, held on CPU to plain
SDPA over each row's keys gathered in order: decode rows and prompt chunks, shared prefix blocks, grouped-query
heads, sliding windows, padding; its block lists against its mask; and compiled, as on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from triton_backend.cache.kv_cache import PagedKVCache, plan
from triton_backend.model import flex_paged, graphs

GROUPS, HEADS, D, BS, BLOCKS = 2, 4, 8, 4, 64


@pytest.fixture
def cache():
    torch.manual_seed(0)
    c = PagedKVCache(1, BLOCKS, BS, GROUPS, D, torch.float64, "cpu", group_major=True)
    c.keys[0].copy_(torch.randn(c.keys[0].shape, dtype=torch.float64))
    c.values[0].copy_(torch.randn(c.values[0].shape, dtype=torch.float64))
    return c


def reference(cache, q, table, query_positions, window=None):
    """SDPA over the row's keys gathered in position order: [len(query_positions), heads * d]."""
    keys, values = (t[0][torch.tensor(table)].transpose(0, 1).flatten(1, 2) for t in (cache.keys, cache.values))
    key_pos = torch.arange(keys.shape[1])
    qp = torch.tensor(query_positions)[:, None]
    mask = key_pos[None, :] <= qp
    if window is not None:
        mask &= key_pos[None, :] >= qp - window
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                         enable_gqa=True)
    return out[0].transpose(0, 1).flatten(1)


def step_of(cache, rows, window=None):
    """``plan`` for rows of (table, first position, tokens): its packed positions and the planned step."""
    positions = np.concatenate([np.arange(first, first + n) for _, first, n in rows])
    step = plan(cache, torch.from_numpy(positions), [n for *_, n in rows], np.concatenate([t for t, *_ in rows]),
                [len(t) for t, *_ in rows], pairs=False, window=window)
    return positions, step


@pytest.mark.parametrize("window", [None, 5])
def test_decode_rows_and_chunks_read_their_own_blocks(cache, window):
    rows = [([3, 7, 1], 9, 1),  # a decode row
            ([3, 7, 5, 2], 12, 1),  # another, sharing the first two blocks (a cached prefix)
            ([3, 7, 9, 11, 12], 6, 13),  # a prompt chunk after the same prefix, over several blocks
            ([20], 0, 1)]  # a row at position 0
    positions, step = step_of(cache, rows, window)
    assert step.flex.kv_counts.shape[0] == 4 and len(step.prompts) == 1  # three decode rows, padded to four
    q = torch.randn(len(positions), HEADS, D, dtype=torch.float64)
    keys, values = cache.flat(0)
    decodes = flex_paged.decode(q[step.decode_index], keys, values, step.flex, None)
    chunk = step.prompts[0]
    prompt = flex_paged.chunk(q[chunk.start:chunk.start + chunk.length], keys, values, chunk.flex, None)
    starts = np.cumsum([0] + [n for *_, n in rows])
    want = [reference(cache, q[starts[i]:starts[i + 1]], table, list(range(first, first + n)), window)
            for i, (table, first, n) in enumerate(rows)]
    torch.testing.assert_close(decodes, torch.cat([want[0], want[1], want[3]]))
    torch.testing.assert_close(prompt, want[2])


def test_a_long_chunk_spans_several_query_tiles(cache):
    table = list(range(1, 50))  # 196 places: a chunk of 150 queries (two tiles of 128) after 40 cached ones
    positions, step = step_of(cache, [(table[:48], 40, 150)])
    chunk = step.prompts[0]
    assert chunk.flex.kv_counts.shape[-1] == 2 and chunk.flex.query_pos.shape[1] == 256
    q = torch.randn(150, HEADS, D, dtype=torch.float64)
    got = flex_paged.chunk(q, *cache.flat(0), chunk.flex, None)
    torch.testing.assert_close(got, reference(cache, q, table[:48], list(range(40, 190))))


def assert_lists_match_the_mask(mask, total_blocks: int) -> None:
    """Each row's (and query tile's) listed blocks are exactly the blocks its mask function lets any of its queries
    see, each once."""
    seen = mask.mask.mask_mod
    rows, _, tiles, _ = mask.kv_indices.shape
    places = torch.arange(total_blocks * BS)
    for r in range(rows):
        for t in range(tiles):
            queries = range(t * flex_paged.Q_TILE, min((t + 1) * flex_paged.Q_TILE, mask.query_pos.shape[1]))
            visible = set()
            for qi in queries:
                got = seen(torch.tensor(r), torch.tensor(0), torch.tensor(qi), places)
                visible |= set((places[got] // BS).tolist())
            listed = mask.kv_indices[r, 0, t, :mask.kv_counts[r, 0, t]].tolist()
            assert sorted(listed) == sorted(visible) and len(set(listed)) == len(listed), (r, t)


@pytest.mark.parametrize("window", [None, 30])
def test_the_block_lists_name_exactly_the_blocks_the_mask_lets_through(cache, window):
    """The compiled kernel reads only the listed blocks (the unfused reference reads them all): a block left off a
    list would drop keys, an extra one would be read for nothing."""
    rows = [([3, 7, 1], 9, 1), ([3, 7, 5, 2], 12, 1), (list(range(10, 60)), 37, 160)]
    _, step = step_of(cache, rows, window)
    for mask in (step.flex, step.prompts[0].flex):
        assert_lists_match_the_mask(mask, cache.total_blocks)


@pytest.mark.parametrize("window", [None, 6])
def test_a_buckets_mask_refilled_step_after_step_lists_and_attends_right(window):
    """The CUDA graphs' way (``graphs.static_mask`` once per bucket, ``refill_mask`` in every step): after each
    refill the lists match the mask function (the padding rows list nothing) and the attention matches SDPA."""
    torch.manual_seed(1)
    c = PagedKVCache(1, BLOCKS, BS, GROUPS, D, torch.float64, "cpu", scratch=True, group_major=True)
    c.keys[0].copy_(torch.randn(c.keys[0].shape, dtype=torch.float64))
    c.values[0].copy_(torch.randn(c.values[0].shape, dtype=torch.float64))
    inputs = graphs.StaticInputs.empty(4, 6, c.scratch, "cpu")
    mask = graphs.static_mask(c, inputs, window)
    steps = ([([3, 7, 1], 9), ([3, 7, 5, 2], 12), ([9], 2), ([40, 41, 42, 43, 44, 45], 22)],
             [([8, 2], 5), ([3, 7, 5, 2, 11], 16)])  # four rows, then two (and two padding rows)
    for rows in steps:
        tables = np.concatenate([t for t, _ in rows])
        positions = np.array([p for _, p in rows])
        inputs.fill(graphs.static_inputs(positions, tables, np.array([len(t) for t, _ in rows]), 4, 6, BS,
                                         c.scratch))
        graphs.refill_mask(mask, c, inputs, window)
        assert_lists_match_the_mask(mask, c.total_blocks)
        assert mask.kv_counts[len(rows):].sum() == 0
        q = torch.randn(len(rows), HEADS, D, dtype=torch.float64)
        got = flex_paged.decode(q, *c.flat(0), mask, None)
        want = torch.cat([reference(c, q[i:i + 1], table, [p], window) for i, (table, p) in enumerate(rows)])
        torch.testing.assert_close(got, want)


def test_compiled_as_on_cuda_it_matches_and_compiles_once_per_shape(cache, monkeypatch):
    """``torch.compile``'s FlexAttention (Inductor's CPU kernel here, Triton's on CUDA) reads only the listed
    blocks; a new step of the same padded shapes, with new tables and a new mask function, reuses the compilation,
    and prompt chunks padded to the same length share one, made at start by ``warm_up``."""
    torch._dynamo.reset()
    monkeypatch.setattr(flex_paged, "kernel", lambda device_type, decode=True: flex_paged.compiled(decode))
    cache32 = PagedKVCache(1, BLOCKS, BS, GROUPS, D, torch.float32, "cpu", group_major=True)
    cache32.keys[0].copy_(cache.keys[0]), cache32.values[0].copy_(cache.values[0])
    steps = ([([3, 7, 1], 9, 1), ([3, 7, 5, 2], 12, 1), ([9], 2, 1)],
             [([8, 2], 5, 1), ([40, 41, 42], 10, 1), ([9], 2, 1), ([30, 31], 7, 1)])
    for i, rows in enumerate(steps):  # three rows and four: both padded to four
        positions, step = step_of(cache32, rows)
        q = torch.randn(len(positions), HEADS, D)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # the second step must not compile again
            got = flex_paged.decode(q, *cache32.flat(0), step.flex, None)
        want = torch.cat([reference(cache32, q[i:i + 1], table, [first]) for i, (table, first, _) in
                          enumerate(rows)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    flex_paged.warm_up(cache32, HEADS, 100)  # one tile: chunks of 1 .. 128 queries
    with torch._dynamo.config.patch(error_on_recompile=True):
        for table, first, n in (([5, 6, 7, 8, 9], 3, 13), (list(range(20, 40)), 10, 61)):
            positions, step = step_of(cache32, [(table, first, n)])
            q = torch.randn(n, HEADS, D)
            got = flex_paged.chunk(q, *cache32.flat(0), step.prompts[0].flex, None)
            torch.testing.assert_close(got, reference(cache32, q, table, list(range(first, first + n))), atol=1e-5,
                                       rtol=1e-5)


@pytest.mark.parametrize("window", [None, 50])
def test_a_tile_of_padding_only_reads_what_the_last_query_does(window):
    """A chunk of 257 queries is padded to 512: its fourth tile holds no real query and reads the last one's
    blocks, never a negative count."""
    start, count = flex_paged.chunk_spans(0, 257, 512, 32, window)
    last_block = 256 // 32
    first_seen = [0, 0, 0, 0] if window is None else [0, (128 - 50) // 32, (256 - 50) // 32, (256 - 50) // 32]
    assert start.tolist() == [first_seen]
    assert count.tolist() == [[127 // 32 - first_seen[0] + 1, 255 // 32 - first_seen[1] + 1,
                                last_block - first_seen[2] + 1, last_block - first_seen[3] + 1]]
