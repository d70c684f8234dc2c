"""The paged KV cache: the step plan (where tokens write, which blocks decodes read) and the paged attention, by
torch operations and by the CPU kernel, against plain softmax attention over each sequence's keys."""

import pytest
import torch

from triton_backend.cache.kv_cache import PagedKVCache, plan


def cache(blocks=16, block_size=4, groups=1, head_dim=2, layers=1, dtype=torch.float32):
    return PagedKVCache(layers, blocks, block_size, groups, head_dim, dtype, "cpu")


def step(c, positions, lengths, tables, pairs=True):
    flat = [b for t in tables for b in t]
    return plan(c, torch.tensor(positions), lengths, flat, [len(t) for t in tables], pairs=pairs)


def test_tokens_write_to_their_block_and_offset():
    c = cache()
    ctx = step(c, [5, 0, 1, 2, 3, 4, 9, 10], [1, 5, 2], [[3, 1], [7, 2], [0, 4, 6]])
    assert ctx.write_blocks.tolist() == [1, 7, 7, 7, 7, 2, 6, 6]
    assert ctx.write_offsets.tolist() == [1, 0, 1, 2, 3, 0, 1, 2]
    assert ctx.decode_index.tolist() == [0]
    first, second = ctx.prompts
    assert (first.start, first.length, first.first, first.blocks) == (1, 5, 0, None)  # reads only itself
    assert (second.start, second.length, second.first) == (6, 2, 9)
    assert second.blocks.tolist() == [0, 4, 6]  # a later chunk reads every block before it


def test_decode_pairs_read_the_pool_in_place_and_gather_only_shared_blocks():
    c = cache()
    # rows: 0 at position 5 (blocks 3, 1), 1 at position 2 (block 0), 2 at position 6 (blocks 3, 2): block 3 shared
    ctx = step(c, [5, 2, 6], [1, 1, 1], [[3, 1], [0], [3, 2]])
    assert ctx.span == 4  # blocks 0..3 as one view
    assert ctx.pair_rows.tolist() == [1, 0, 2, 0, 2]  # owners of blocks 0..3, then the extra reader of block 3
    assert ctx.extra_blocks.tolist() == [3]
    seen = ctx.valid.sum(1).tolist()
    assert seen == [3, 2, 3, 4, 4]  # up to and with each row's own position


def test_a_scattered_pool_is_gathered_instead_of_scanned():
    c = cache(blocks=400)
    ctx = step(c, [1], [1], [[300]])
    assert ctx.span == 0 and ctx.extra_blocks.tolist() == [300] and ctx.pair_rows.tolist() == [0]
    # the edge: a range of 2 x the blocks read + 64 is still scanned, one more block is not
    assert step(c, [1], [1], [[65]]).span == 66
    assert step(c, [1], [1], [[66]]).span == 0
    # with two blocks read the slack is 2 x 2 + 64 blocks
    assert step(c, [5], [1], [[0, 67]]).span == 68
    assert step(c, [5], [1], [[0, 68]]).span == 0


@pytest.mark.parametrize("bad, message", [
    (([0, 2], [2], [[0]]), "a segment's tokens must be consecutive positions"),
    (([0, 1, 2, 3, 4], [5], [[0]]), "a segment's block table does not hold its positions"),  # too short for 4
    (([0], [1], [[99]]), "a segment's block table does not hold its positions"),  # a block outside the pool
    (([0], [1], [[16]]), "a segment's block table does not hold its positions"),  # one past the last block
    (([0], [1], [[-1]]), "a segment's block table does not hold its positions"),
    (([0, 1], [1], [[0]]), "a step's segments do not cover its tokens"),
])
def test_malformed_steps_are_refused(bad, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        step(cache(), *bad)


@pytest.mark.parametrize("lengths, tables, table_lengths", [
    ([1], [0], [1, 0]),  # a block table more than segments
    ([1], [0, 1], [1]),  # table entries beyond the tables' lengths
    ([1, 0], [0], [1, 0]),  # an empty segment
])
def test_each_inconsistency_of_a_step_is_refused_on_its_own(lengths, tables, table_lengths):
    with pytest.raises(ValueError, match="^a step's segments do not cover its tokens$"):
        plan(cache(), torch.tensor([0]), lengths, tables, table_lengths)


def reference(q, keys, values, ends, scale):
    """softmax(qK^T)V of each row over its own keys 0..end (q [n, heads, d], keys [n][T, groups, d])."""
    out = []
    for i, end in enumerate(ends):
        k, v = keys[i][:end], values[i][:end]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        w = torch.softmax(torch.einsum("hd,thd->ht", q[i].double(), k.double()) * scale, dim=-1)
        out.append(torch.einsum("ht,thd->hd", w, v.double()).flatten())
    return torch.stack(out)


TABLES = {"three": [[5, 1, 2], [5, 7], [5, 0, 9, 3]],  # per-row softmax, a shared block gathered for its readers
          "alone": [[5, 1, 2]],  # the batch-1 path: the pool's first blocks read in place
          "alone, far": [[5, 1, 99]]}  # one row whose blocks are too scattered to scan: every pair gathered


@pytest.mark.parametrize("size", [1.0, 40.0], ids=["scores", "large scores"])  # 40: exp overflows unshifted
@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("layout", list(TABLES))
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)])
def test_paged_decode_equals_softmax_attention_over_each_sequence(heads, groups, layout, kernel, size):
    """Sequences whose blocks are shared and scattered. The result must be plain attention over each sequence's
    own keys, whatever blocks hold them (blocks of the pool a row does not hold are masked out); by torch
    operations over (row, block) pairs, and by the CPU kernel over each row's own table."""
    from triton_backend.model.attention import PagedAttention

    g = torch.Generator().manual_seed(0)
    d, bs = 8, 4
    c = cache(blocks=100, block_size=bs, groups=groups, head_dim=d)
    c.keys[0].normal_(generator=g)
    c.values[0].normal_(generator=g)
    tables = TABLES[layout]
    positions = [9, 6, 14][: len(tables)]
    ctx = step(c, positions, [1] * len(tables), tables, pairs=not kernel)
    if kernel:  # no pairs: each row's table and the keys it sees
        assert ctx.pair_rows is None and ctx.lengths.tolist() == [p + 1 for p in positions]
        assert [ctx.tables[start:start + len(t)].tolist() for start, t in zip(ctx.table_starts, tables)] == tables
    else:
        assert (ctx.extra_blocks is None) == (layout == "alone") and (ctx.span == 0) == (layout == "alone, far")
    n = len(tables)
    q = size * torch.randn(n, heads, d, generator=g)
    k, v = torch.randn(n, groups, d, generator=g), torch.randn(n, groups, d, generator=g)
    attn = PagedAttention.__new__(PagedAttention)
    attn.layer_index, attn.softmax_scale = 0, None
    torch.nn.Module.__init__(attn)
    ours = attn._cached(ctx, q, k, v)
    seqs = [(torch.cat([c.keys[0][b].transpose(0, 1) for b in t]), torch.cat([c.values[0][b].transpose(0, 1)
                                                                              for b in t])) for t in tables]
    for i, p in enumerate(positions):  # the step wrote each token's own key where the sequence reads it
        torch.testing.assert_close(seqs[i][0][p], k[i])
    expected = reference(q, [s[0] for s in seqs], [s[1] for s in seqs], [p + 1 for p in positions], d ** -0.5)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
