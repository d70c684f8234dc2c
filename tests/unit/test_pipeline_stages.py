"""Pipeline stages: Megatron's layer split, pipeline checkpoints read at any layout, and the engine over real gloo
stages (``ranks/local.py``) giving exactly what one rank gives, with one batch or several in flight."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from preprocessing.params import SamplingParams
from triton_backend.checkpoints import CheckpointError, legacy, read_architecture
from triton_backend.model.architecture import GPTArchitecture
from triton_backend.ranks import local

from .models import ARCH, ROTARY_ARCH, context_model

pytestmark = pytest.mark.timeout(600)
DEEP = dataclasses.replace(ARCH, num_layers=4, max_position_embeddings=128, seq_length=128)
# 4 KiB of keys and values per token: a cache of 1 MiB holds 8 blocks of 32 tokens, too few for the requests below
# at once (sequences are preempted and resumed)
DEEP_ROTARY = dataclasses.replace(ROTARY_ARCH, num_layers=4, num_attention_heads=8, num_query_groups=8,
                                  max_position_embeddings=128, seq_length=128)


def test_stage_layers_follow_megatron_even_and_recorded_uneven_splits():
    six = dataclasses.replace(ARCH, num_layers=6)
    assert six.stage_layers(1) == [range(6)]
    assert six.stage_layers(3) == [range(0, 2), range(2, 4), range(4, 6)]
    uneven = dataclasses.replace(six, num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=1)
    assert uneven.stage_layers(3) == [range(0, 1), range(1, 5), range(5, 6)]
    assert uneven.stage_layers(4) == [range(0, 1), range(1, 3), range(3, 5), range(5, 6)]
    assert uneven.stage_layers(2) == [range(0, 3), range(3, 6)]  # the recorded split does not fit two: even
    with pytest.raises(ValueError, match="num_layers=6 cannot be split in 4 pipeline stages"):
        six.stage_layers(4)
    config = uneven.transformer_config(pipeline_parallel=3)
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (1, 1)
    read = GPTArchitecture.from_megatron_args(uneven.to_megatron_args())
    assert read.stage_layers(3) == uneven.stage_layers(3)


def test_a_served_split_is_any_megatron_split_of_the_layers_or_the_balanced_one():
    eight = dataclasses.replace(ARCH, num_layers=8)
    assert eight.served_split(2, "") is eight and eight.served_split(1, "7,1") is eight
    assert eight.served_split(2, "5,3").stage_layers(2) == [range(0, 5), range(5, 8)]
    assert eight.served_split(4, "1,3,3,1").stage_layers(4) == [range(0, 1), range(1, 4), range(4, 7), range(7, 8)]
    assert eight.served_split(2, "4,4").stage_layers(2) == eight.stage_layers(2)
    recorded = dataclasses.replace(eight, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=3)
    assert recorded.served_split(2, "4,4").stage_layers(2) == [range(0, 4), range(4, 8)]  # replaces the recorded
    for pp, layers, rule in ((2, "4,3", "8 layers in all"), (2, "8,0", "at least one layer"),
                             (2, "2,2,2,2", "PP=2 stages"), (4, "2,3,2,1", "as many layers each"),
                             (2, "4;4", "'balanced' or the layers of each stage")):
        with pytest.raises(ValueError, match=f"PP_LAYERS.*{rule}"):
            eight.served_split(pp, layers)
    # A wide vocabulary: the last stage's output layer weighs as much as several layers, so it holds fewer layers.
    wide = dataclasses.replace(ARCH, num_layers=24, hidden_size=64, ffn_hidden_size=256, padded_vocab_size=3200)
    sizes = [len(s) for s in wide.served_split(2, "balanced").stage_layers(2)]
    assert sizes[0] > sizes[1] and sum(sizes) == 24
    per_layer, output = 12 * 64 * 64, 3200 * 64  # 4 x h^2 attention and 8 x h^2 MLP; the output layer
    assert abs(sizes[0] - (sizes[1] + output / per_layer)) <= 1  # the two stages weigh the same, to one layer
    narrow = dataclasses.replace(wide, padded_vocab_size=64)
    assert [len(s) for s in narrow.served_split(2, "balanced").stage_layers(2)] == [12, 12]


def save(model, arch, directory, pp=1):
    """A legacy checkpoint of ``model`` split in ``pp`` stages, as make_checkpoint --pp writes it."""
    args = arch.to_megatron_args(pipeline_model_parallel_size=pp)
    stages = arch.stage_layers(pp) if pp > 1 else None
    for stage in range(pp):
        legacy.save(model, args, directory, 1, stages, stage if stages else None)
    return directory


@pytest.mark.parametrize("arch", [DEEP, DEEP_ROTARY], ids=["tied", "untied"])
def test_a_pipeline_checkpoint_holds_each_stage_and_reads_back_whole(tmp_path, arch):
    model = context_model(arch)
    save(model, arch, tmp_path / "pp2", pp=2)
    grid = legacy.shard_grid(tmp_path / "pp2")
    assert [[f.parent.name for f in stage] for stage in grid] == [["mp_rank_00_000"], ["mp_rank_00_001"]]
    first, last = (torch.load(stage[0], weights_only=False)["model"] for stage in grid)
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "decoder.final_layernorm.weight" in last and "embedding.word_embeddings.weight" not in last
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0", "1"}
    assert {k.split(".")[2] for k in last if k.startswith("decoder.layers.")} == {"0", "1"}  # numbered per stage
    assert torch.equal(last["decoder.layers.0.mlp.linear_fc2.weight"],
                       model.state_dict()["decoder.layers.2.mlp.linear_fc2.weight"])
    if arch is DEEP:  # a tied last stage keeps its copy of the embedding, as Megatron's does
        assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
    from triton_backend.model.gpt import build_model

    whole = build_model(arch)
    legacy.load_weights(whole, tmp_path / "pp2", arch)
    for name, tensor in model.state_dict().items():
        if torch.is_tensor(tensor):
            assert torch.equal(whole.state_dict()[name], tensor), name


def test_a_layout_that_does_not_split_is_refused_by_name(tmp_path):
    model = context_model(DEEP)
    save(model, DEEP, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="cannot be served at PP=3: num_layers=4 cannot be split in 3"):
        read_architecture(tmp_path / "ckpt", 1, 3)


REQUESTS = [
    ([5, 17, 33, 4, 90, 61, 12], SamplingParams(max_tokens=12, end_id=-1, temperature=0)),
    ([6, 17, 33, 4, 90, 61, 12], SamplingParams(max_tokens=12, end_id=-1, temperature=0, return_log_probs=True)),
    # a long prompt read in chunks, and the same prompt again (its blocks come from the prefix cache)
    (list(range(5, 75)), SamplingParams(max_tokens=30, end_id=-1, temperature=0)),
    (list(range(5, 75)) + [9], SamplingParams(max_tokens=30, end_id=-1, temperature=0)),
    ([9, 8, 7, 6], SamplingParams(max_tokens=10, end_id=-1, temperature=0.9, top_p=0.9, top_k=20, seed=11,
                                  repetition_penalty=1.3, presence_penalty=0.5, min_length=3)),
    ([3, 4, 5, 6, 7], SamplingParams(max_tokens=8, temperature=0, top_log_probs=3, return_prompt_log_probs=True,
                                     end_id=40, return_log_probs=True)),
    ([11, 12, 13], SamplingParams(max_tokens=0, return_prompt_log_probs=True, top_log_probs=2)),  # scoring only
    ([21, 22, 23], SamplingParams(max_tokens=9, end_id=-1, temperature=1.0, seed=5)),
    (list(range(80, 10, -1)), SamplingParams(max_tokens=40, end_id=-1, temperature=0)),
    (list(range(30, 100)), SamplingParams(max_tokens=40, end_id=-1, temperature=0.7, seed=3)),
]


def run(checkpoint, tp, pp, microbatches, graphs=None, **engine):
    # 8 blocks in every layout: each rank holds 1 / (TP x PP) of a token's keys and values
    result = local.spawn(tp * pp, local.generate, str(checkpoint), tp, pp, microbatches, REQUESTS, vocab_size=120,
                         eos_id=2, kv_cache_mb=1 / (tp * pp), prefill_tokens=32, graphs=graphs, **engine)[0]
    assert result["fatal"] is None
    assert not [o.error for o in result["outcomes"] if o.error]
    return result


def assert_same(got, want, label):
    for i, (a, b) in enumerate(zip(got["outcomes"], want["outcomes"])):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason, f"{label}, request {i}"
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4), f"{label}, request {i}"
        assert a.prompt_logprobs == pytest.approx(b.prompt_logprobs, abs=1e-4), f"{label}, request {i}"
        assert [ids for ids, _ in a.top] == [ids for ids, _ in b.top], f"{label}, request {i}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same rotary 4-layer model saved whole and in two stages."""
    tmp = tmp_path_factory.mktemp("pp")
    model = context_model(DEEP_ROTARY)
    return save(model, DEEP_ROTARY, tmp / "whole"), save(model, DEEP_ROTARY, tmp / "stages", pp=2)


@pytest.fixture(scope="module")
def one_rank(checkpoints):
    result = run(checkpoints[0], 1, 1, 1)
    texts = [tuple(o.tokens) for o in result["outcomes"]]
    assert texts[0] != texts[1] and len(set(texts[0])) > 2  # the text depends on the whole prompt
    assert result["stats"]["preemptions"] > 0  # a cache of one MiB: sequences are sent back and resumed
    return result


@pytest.mark.parametrize("microbatches", [1, 2])
def test_two_stages_give_what_one_rank_gives(checkpoints, one_rank, microbatches):
    result = run(checkpoints[1], 1, 2, microbatches)
    assert_same(result, one_rank, f"PP=2, {microbatches} in flight")
    assert result["stats"]["preemptions"] > 0
    first, last = result["weights"]
    assert max(first, last) < 0.75 * one_rank["weights"][0]  # each stage holds its own layers only
    if microbatches == 2:
        assert result["stats"]["steps"] > one_rank["stats"]["steps"]  # two groups, each its own steps


def test_stages_split_otherwise_than_saved_give_what_one_rank_gives(checkpoints, one_rank):
    """Saved in two stages of two layers, served as three layers and one (PP_LAYERS)."""
    result = run(checkpoints[1], 1, 2, 2, pp_layers="3,1")
    assert_same(result, one_rank, "PP=2 split 3 + 1")
    first, last = result["weights"]
    assert first > last


def test_static_decode_steps_in_every_stage_give_what_one_rank_gives(checkpoints, one_rank):
    """Each stage's decode steps through its own static buckets (CUDA graphs' steps, run without capture)."""
    assert_same(run(checkpoints[1], 1, 2, 2, graphs="eager"), one_rank, "PP=2, static decode steps")


def test_tensor_and_pipeline_parallel_together_give_what_one_rank_gives(checkpoints, one_rank):
    assert_same(run(checkpoints[1], 2, 2, 2), one_rank, "TP=2 x PP=2")


def test_a_pipeline_checkpoint_serves_on_one_rank(checkpoints, one_rank):
    assert_same(run(checkpoints[1], 1, 1, 1), one_rank, "a PP=2 checkpoint at PP=1")
