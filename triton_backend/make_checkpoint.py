"""Write a Megatron checkpoint in either format at a chosen tensor-parallel size, for tests and for users.

    torchrun --standalone --nproc-per-node 2 -m triton_backend.make_checkpoint \\
        --from demo_model/checkpoint --format legacy --out /tmp/demo_tp2_legacy
    torchrun --standalone --nproc-per-node 2 -m triton_backend.make_checkpoint \\
        --random llama --vocab 4096 --format torch_dist --out /tmp/llama_tp2

``--from`` re-saves an existing checkpoint (any format, any TP x PP); ``--random`` writes a seeded random-init
model of a preset architecture (the same weights at every TP and PP, so outputs can be compared across them).
The TP size is the number of ranks torchrun starts divided by ``--pp`` (default 1), the pipeline stages: in
the legacy format each stage's shards go to ``mp_rank_TT_PPP`` as Megatron training writes them (every rank
holds its TP shard of the whole model and writes one stage of it), and with ``--ep`` each expert rank's part
as ``mp_rank_TT[_PPP]_EEE``; torch_dist shards are the same at any
layout, and the args record the pipeline size. ``--tokenizer-type TYPE --tokenizer PATH`` records a
tokenizer in the checkpoint's args as Megatron training does (its files' paths, and with ``--random`` a
vocabulary sized to it); ``--random`` without them records the demo model's sentencepiece tokenizer.
For example, with the GPT-2 BPE ``tools/make_tokenizers.py`` writes:

    torchrun --standalone --nproc-per-node 1 -m triton_backend.make_checkpoint --random gpt \
        --tokenizer-type GPT2BPETokenizer --tokenizer /tmp/tokenizers/gpt2 --out /tmp/gpt_bpe
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time

import torch

from triton_backend import checkpoints
from triton_backend.config import DEMO_DIR
from triton_backend.model.architecture import GPTArchitecture
from triton_backend.model.gpt import build_model, init_parallel

PRESETS = {
    # GPT-2 style, like the demo model.
    "gpt": dict(num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
                max_position_embeddings=256, seq_length=256),
    # The other family: rotary positions, RMSNorm, SwiGLU, grouped-query attention, untied output, no biases.
    "llama": dict(num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_channels=16,
                  ffn_hidden_size=384, max_position_embeddings=256, seq_length=256, position_embedding_type="rope",
                  normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                  untie_embeddings_and_output_weights=True),
    # About 350M parameters (GPT-2 medium shape) for GPU throughput figures.
    "gpt-350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096,
                     max_position_embeddings=2048, seq_length=2048),
    # Llama-3.1-style: grouped-query attention, Llama-3.1's RoPE scaling and base, untied output; with a Llama-3-style
    # HuggingFace tokenizer trained on the demo corpus, written beside the checkpoint unless --tokenizer names one.
    "llama3": dict(num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=2, kv_channels=16,
                   ffn_hidden_size=384, max_position_embeddings=1024, seq_length=1024, position_embedding_type="rope",
                   rotary_base=500000, use_rope_scaling=True, normalization="RMSNorm", swiglu=True,
                   add_bias_linear=False, untie_embeddings_and_output_weights=True),
    # Llama-style with a 4,096-token context and little compute per token, so that the KV cache (paging,
    # prefix caching, chunked prefill) is what a CPU benchmark measures.
    "long": dict(num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_channels=16,
                 ffn_hidden_size=384, max_position_embeddings=4096, seq_length=4096, position_embedding_type="rope",
                 normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                 untie_embeddings_and_output_weights=True),
    # Mixtral-style mixture of experts: the llama preset with 8 experts in every layer, softmax top-2.
    "moe": dict(num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_channels=16,
                ffn_hidden_size=384, max_position_embeddings=256, seq_length=256, position_embedding_type="rope",
                normalization="RMSNorm", swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True,
                num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=128),
    # DeepSeek-V3-style routing: sigmoid scores with a persistent expert bias, group-limited (4 groups, the best 2),
    # top-4 scaled by 2.5, one shared expert, the first layer dense.
    "moe-deepseek": dict(num_layers=3, hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_channels=16,
                         ffn_hidden_size=384, max_position_embeddings=256, seq_length=256,
                         position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                         untie_embeddings_and_output_weights=True, num_experts=8, moe_router_topk=4,
                         moe_ffn_hidden_size=96, moe_router_score_function="sigmoid",
                         moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                         moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=96,
                         moe_layer_freq=(0, 1, 1)),
}


DEMO_TOKENIZER = DEMO_DIR / "tokenizer.model"


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's vocabulary padding: a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return math.ceil(vocab / multiple) * multiple


def llama3_tokenizer(directory: pathlib.Path) -> pathlib.Path:
    """The ``llama3`` preset's tokenizer directory: rank 0 trains it, the other ranks wait for its last file."""
    from preprocessing.tokenization import build

    if os.environ.get("RANK", "0") == "0":
        build.huggingface_directory(directory)
    else:
        deadline = time.monotonic() + 120
        while not (directory / "tokenizer_config.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
    return directory


def tokenizer_args(path: pathlib.Path | None, kind: str | None) -> dict:
    """The args Megatron training records for this tokenizer (``_ids``: how many ids it makes, for the
    vocabulary of a random model)."""
    from preprocessing import tokenization
    from preprocessing.tokenization.tiktoken_json import DEFAULT_NUM_SPECIAL_TOKENS

    args: dict = {}
    if kind == "TikTokenizer" and path is not None:  # the vocabulary size is an arg of its own: the whole file
        entries = len(json.loads(path.read_text()))
        args = {"vocab_size": entries + DEFAULT_NUM_SPECIAL_TOKENS, "tiktoken_pattern": "v2",
                "tiktoken_num_special_tokens": DEFAULT_NUM_SPECIAL_TOKENS}
    spec = tokenization.resolve(args, path, kind)
    tokenizer = tokenization.load(spec)
    return {"tokenizer_type": spec.type, **spec.files, **args, "_ids": tokenizer.vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", type=pathlib.Path, help="checkpoint to re-save")
    source.add_argument("--random", choices=sorted(PRESETS), help="random-init preset architecture")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--format", choices=["torch_dist", "legacy"], default="torch_dist")
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary size (--random)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--init-std", type=float, default=0.02, help="weight init std (--random)")
    parser.add_argument("--iteration", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (the job's ranks / PP is its TP)")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size to save at (legacy: mp_rank_TT[_PPP]_EEE shards, each expert split "
                             "TP ways as Megatron's default expert_tensor_parallel_size does; torch_dist: args only)")
    parser.add_argument("--tokenizer-type", help="tokenizer_type to record (with --tokenizer; guessed when left out)")
    parser.add_argument("--tokenizer", type=pathlib.Path, help="tokenizer file or directory to record")
    a = parser.parse_args()
    if a.random == "llama3" and not (a.tokenizer or a.tokenizer_type):
        a.tokenizer, a.tokenizer_type = llama3_tokenizer(a.out / "tokenizer"), "HuggingFaceTokenizer"
    recorded = tokenizer_args(a.tokenizer, a.tokenizer_type) if a.tokenizer or a.tokenizer_type else {}
    if recorded and a.random:
        a.vocab = recorded.pop("_ids")
    recorded.pop("_ids", None)
    if a.random and not recorded:  # the presets' default: the demo model's tokenizer (4,096 ids, --vocab's default)
        recorded = {"tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": str(DEMO_TOKENIZER)}

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.pp < 1 or world % a.pp:
        parser.error(f"--pp {a.pp} must divide the {world} ranks torchrun started")
    # Ranks with the same TP rank build the same whole shard (Megatron's data-parallel replicas): each writes
    # one pipeline stage of it.
    init_parallel(world // a.pp, "cpu")
    tp = world // a.pp
    torch.manual_seed(a.seed)
    if a.source:
        args = checkpoints.read_args(a.source)
        arch = checkpoints.read_architecture(a.source, tp)
        model = build_model(arch, tensor_parallel=tp)
        checkpoints.load_weights(model, a.source, arch)
        extra = {k: v for k, v in vars(args).items() if k not in arch.to_megatron_args().__dict__}
    else:
        arch = GPTArchitecture(padded_vocab_size=padded_vocab(a.vocab, tp), **PRESETS[a.random])
        model = build_model(arch, tensor_parallel=tp, init_method_std=a.init_std)
        if arch.moe_router_enable_expert_bias:  # training moves it from zero: so that routing depends on it
            for name, buffer in model.named_buffers():
                if name.endswith("router.expert_bias"):
                    buffer.normal_(0.0, 0.1)
        extra = {"seed": a.seed, "init_method_std": a.init_std}
    if a.ep > 1 and (arch.num_experts or 0) % a.ep:
        parser.error(f"--ep {a.ep} must divide num_experts={arch.num_experts}")
    extra.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=a.pp, ckpt_format=a.format, **recorded)
    if arch.num_experts:
        extra.update(expert_model_parallel_size=a.ep, expert_tensor_parallel_size=tp)
    megatron_args = arch.to_megatron_args(**extra)
    if a.format == "legacy":
        try:
            stages = arch.stage_layers(a.pp) if a.pp > 1 else None
        except ValueError as err:
            parser.error(str(err))
        stage = torch.distributed.get_rank() // tp
        checkpoints.legacy.save(model, megatron_args, a.out, a.iteration, stages, stage)
    else:
        checkpoints.save(model, megatron_args, a.out, a.iteration)
    if torch.distributed.get_rank() == 0:
        params = sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in model.parameters())
        print(f"wrote a {a.format} checkpoint at TP={tp} x PP={a.pp} to {a.out}: {params / 1e6:.1f} M parameters")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
