"""Our in-process engine against Megatron-core's own dynamic inference engine, on the same weights and one GPU.

    python3 tools/gpu_megatron_engine.py [--streams 16] [--prompt 128] [--tokens 128] [--megatron-graphs none local]

A random-init model of Llama-3.2-1B's shape (``tools/gpu_decode.py``) in bfloat16: ``--streams`` requests of
``--prompt`` random ids each generate exactly ``--tokens`` tokens, greedy, ignoring end tokens. Each engine runs the
workload once untimed (compilation, graphs, allocator), then, timed by the wall clock from the first submission to the
last token, once more with other prompts (no prefix cache helps). Ours: ``CachedGPT`` (CUDA graphs, FlexAttention)
under ``Engine``. Megatron's: ``DynamicInferenceEngine`` over a ``DynamicInferenceContext`` (its block-paged KV cache),
``GPTInferenceWrapper`` and ``TextGenerationController``, every request added and then stepped until done, eagerly
(``none``) and with its per-layer CUDA graphs of decode steps (``local``).

Megatron's dynamic attention calls flash-attn over its own cache, never a core-attention module, and needs the model's
RoPE; our model has none of its own (``PagedAttention`` applies it). So Megatron runs a twin: Megatron's local layer
spec with ``position_embedding_type="rope"`` and a copy of our state dict, whose plain forward is held to ours
(``twin_max_logit_diff``). It needs flash-attn >= 2.7.3 or flash-attn 3 (``megatron/core/transformer/attention.py``);
where its side fails, a line says why and the other figures still come.

JSON lines: ours (output tokens/s), then each Megatron run with the ratio ours / Megatron and how many requests
generated the very same ids in both (random weights leave near-ties that two kernels may break differently).
``--tiny --device cpu`` runs our half on a small model on CPU and checks the twin's weights there (a dry run).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import pathlib
import sys
import time
import types
from unittest import mock

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from preprocessing.params import SamplingParams  # noqa: E402
from tools.gpu_decode import LLAMA_1B, TINY  # noqa: E402
from triton_backend.engine.engine import CUDA_PREFILL_TOKENS, Engine  # noqa: E402
from triton_backend.model.architecture import GPTArchitecture  # noqa: E402
from triton_backend.model.gpt import CachedGPT, build_model, init_parallel, kv_bytes_per_token  # noqa: E402


def prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (count, length), generator=generator).tolist()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_ours(engine: Engine, batch: list[list[int]], tokens: int, device: str):
    """Seconds for the whole batch and each request's generated ids."""
    params = SamplingParams(max_tokens=tokens, end_id=-1, temperature=0.0)
    sync(device)
    started = time.perf_counter()
    with engine._wake:  # queued under the engine's lock: its first step sees every prompt, as Megatron's does
        gens = [engine.submit(p, params) for p in batch]
    for g in gens:
        if not g.wait(600) or g.error:
            raise RuntimeError(f"our engine: {g.error or 'no answer in 600 s'}")
    sync(device)
    return time.perf_counter() - started, [list(g.tokens) for g in gens]


def twin(arch: GPTArchitecture, model, dtype, device: str, graphs: str):
    """Megatron's local-spec GPTModel with its own RoPE and ``model``'s weights (``cuda_graph_impl=graphs``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    # no initialisation: every weight is overwritten; the CUDA-graph layers need the inference RNG tracker
    config = arch.transformer_config(dtype, init_method_std=0.02, perform_initialization=False,
                                     cuda_graph_impl=graphs, inference_rng_tracker=True)
    spec = get_gpt_layer_local_spec(normalization=arch.normalization, qk_layernorm=arch.qk_layernorm)
    out = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=arch.padded_vocab_size,
                   max_sequence_length=arch.max_position_embeddings,
                   position_embedding_type=arch.position_embedding_type, rotary_percent=arch.rotary_percent,
                   rotary_base=arch.rotary_base, rope_scaling=arch.use_rope_scaling,
                   rope_scaling_factor=arch.rope_scaling_factor,
                   share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights).to(device)
    ours, theirs = model.state_dict(), out.state_dict()
    if set(ours) != set(theirs):
        raise KeyError(f"state dicts differ: ours only {sorted(set(ours) - set(theirs))[:6]}, "
                       f"Megatron's only {sorted(set(theirs) - set(ours))[:6]}")
    out.load_state_dict(ours, strict=True)
    return out.eval()  # the dynamic attention asserts eval mode


@torch.inference_mode()
def logit_gap(a, b, tokens: list[int], device: str) -> float:
    """Largest logit difference of two models' plain (cache-less) forwards over ``tokens``. The causal mask is given
    (True: hidden), as Megatron's local attention would otherwise build its own on CUDA; ours masks by itself."""
    ids = torch.tensor([tokens], device=device)
    positions = torch.arange(len(tokens), device=device)[None]
    mask = torch.ones(len(tokens), len(tokens), dtype=torch.bool, device=device).triu(1)[None, None]
    return (a(ids, positions, mask).float() - b(ids, positions, mask).float()).abs().max().item()


def run_megatron(model, arch, dtype, a, graphs: str, warm: list[list[int]], batch: list[list[int]], result: dict):
    """Megatron's dynamic engine over a twin of ``model``, filling ``result`` as it goes: the twin's logit gap first
    (it needs no flash-attn), then the timed run's seconds and ids."""
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.sampling_params import SamplingParams as MegatronParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import attention

    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True, force_reset_rng=True)
    net = twin(arch, model, dtype, "cuda", graphs)
    if graphs == "none":  # a graphed twin's plain forward would take the path of training's graphs
        result["twin_max_logit_diff"] = logit_gap(model, net, batch[0], "cuda")
    if not attention.HAVE_FA3 and importlib.util.find_spec("flash_attn") is None:  # else an assert at the first step
        raise ModuleNotFoundError("Megatron's dynamic batching needs flash-attn >= 2.7.3 or flash-attn 3: neither "
                                  "is installed")
    seq, block = a.prompt + a.tokens, 256  # flash-attn 2's paged KV wants blocks of a multiple of 256 tokens
    blocks = 2 * a.streams * -(-seq // block) + 2  # twice what the requests take, and the dummy block
    rounder = DynamicInferenceContext.REQUEST_ROUNDER
    head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
    context = DynamicInferenceContext(  # its num_attention_heads sizes the cache: the key-value heads
        params_dtype=dtype, num_layers=arch.num_layers, kv_channels=head_dim,
        num_attention_heads=arch.num_query_groups or arch.num_attention_heads,
        max_sequence_length=seq, buffer_size_gb=blocks * block * kv_bytes_per_token(arch, 1, dtype) / 2**30,
        block_size_tokens=block, max_requests=-(-a.streams // rounder) * rounder,
        max_tokens=max(CUDA_PREFILL_TOKENS, a.streams * a.prompt),  # the whole prefill in one step, as ours
        num_cuda_graphs=16 if graphs == "local" else None,  # Megatron-LM's default --inference-...-num-cuda-graphs
        use_cuda_graphs_for_non_decode_steps=False)  # graphs for decode steps only, as ours
    wrapper = GPTInferenceWrapper(net, InferenceWrapperConfig(
        hidden_size=arch.hidden_size, params_dtype=dtype, inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=arch.padded_vocab_size), context)
    # ids in, ids out: the controller reads only these of a tokenizer (finished requests are detokenized)
    tokenizer = types.SimpleNamespace(vocab_size=arch.padded_vocab_size, eod=-1, detokenize=lambda ids, **_: "")
    engine = DynamicInferenceEngine(TextGenerationController(wrapper, tokenizer), context, random_seed=0)
    params = MegatronParams(top_k=1, num_tokens_to_generate=a.tokens, termination_id=-1)  # top_k 1: argmax
    ids = itertools.count()

    def generate(batch):  # as its ``generate``: every request added, then steps until none is left (here, bounded)
        sync("cuda")
        started = time.perf_counter()
        for prompt in batch:
            engine.add_request(next(ids), prompt, params)
        records, steps = [], 0
        while engine.has_unfinished_requests():
            if steps > 4 * seq:
                raise RuntimeError(f"Megatron's engine had not finished after {steps} steps")
            records += engine.step_modern()["finished_request_records"]
            steps += 1
        sync("cuda")
        records.sort(key=lambda r: r.request_id)
        return time.perf_counter() - started, [list(r.merge().generated_tokens) for r in records]

    generate(warm)
    result["seconds"], result["outputs"] = generate(batch)


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How many requests generated the very same ids in both, and for how many tokens each agreed from its start."""
    common = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
              for x, y in zip(ours, theirs)]
    return {"greedy_identical": sum(x == y for x, y in zip(ours, theirs)), "requests": len(ours),
            "common_prefix_min": min(common), "common_prefix_mean": round(sum(common) / len(common), 1)}


def error_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, help="concurrent requests (default 16; --tiny 4)")
    parser.add_argument("--prompt", type=int, help="prompt tokens per request (default 128; --tiny 32)")
    parser.add_argument("--tokens", type=int, help="generated tokens per request (default 128; --tiny 16)")
    parser.add_argument("--megatron-graphs", nargs="+", choices=("none", "local"), default=["none", "local"],
                        help="Megatron's cuda_graph_impl for each of its runs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model and workload (a dry run on CPU)")
    a = parser.parse_args(argv)
    a.streams = a.streams or (4 if a.tiny else 16)
    a.prompt = a.prompt or (32 if a.tiny else 128)
    a.tokens = a.tokens or (16 if a.tiny else 128)
    init_parallel(1, a.device)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    seq = a.prompt + a.tokens
    arch = GPTArchitecture(max_position_embeddings=seq, seq_length=seq, **(TINY if a.tiny else LLAMA_1B))
    torch.manual_seed(0)
    model = build_model(arch, dtype, init_method_std=0.02).to(a.device)
    prefill = max(CUDA_PREFILL_TOKENS if a.device == "cuda" else 0, a.streams * a.prompt)
    gpt = CachedGPT(model, arch, max_slots=a.streams, max_len=seq)
    gpt.prepare(prefill)
    warm = prompts(a.streams, a.prompt, arch.padded_vocab_size, seed=1)
    batch = prompts(a.streams, a.prompt, arch.padded_vocab_size, seed=2)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(json.dumps({"device": name, "model": "tiny" if a.tiny else "llama-3.2-1b-shape", "dtype": str(dtype),
                      "streams": a.streams, "prompt_tokens": a.prompt, "output_tokens": a.tokens}), flush=True)
    engine = Engine(gpt, arch.padded_vocab_size, -1, prefill_tokens=prefill).start()
    try:
        run_ours(engine, warm, a.tokens, a.device)
        seconds, ours = run_ours(engine, batch, a.tokens, a.device)
    finally:
        engine.stop()
    if any(len(t) != a.tokens for t in ours):
        raise RuntimeError(f"our engine generated {sorted({len(t) for t in ours})} tokens, not {a.tokens}")
    ours_rate = a.streams * a.tokens / seconds
    print(json.dumps({"engine": "ours", "seconds": round(seconds, 3), "output_tokens_per_s": round(ours_rate, 1),
                      "cuda_graphs": gpt.graphs is not None, "flex": gpt.flex}), flush=True)
    if a.device != "cuda":
        print(json.dumps({"megatron_dynamic_engine": "needs CUDA"}), flush=True)
        try:  # what does run here: the twin Megatron would serve, held to our model's plain forward. Megatron's
            # RoPE moves its frequencies to torch.cuda.current_device() and its attention forks the CUDA RNG (for a
            # dropout of 0): here, the CPU and no fork
            with mock.patch("torch.cuda.current_device", return_value="cpu"), \
                    mock.patch("megatron.core.tensor_parallel.get_cuda_rng_tracker",
                               return_value=types.SimpleNamespace(fork=contextlib.nullcontext)):
                gap = logit_gap(model, twin(arch, model, dtype, a.device, "none"), batch[0], a.device)
            print(json.dumps({"twin_max_logit_diff": gap}), flush=True)
        except Exception as err:
            print(json.dumps({"twin": "failed", "error": error_line(err)}), flush=True)
        return 0
    for graphs in a.megatron_graphs:
        result = {}
        try:
            run_megatron(model, arch, dtype, a, graphs, warm, batch, result)
        except Exception as err:  # Megatron's side may not build or run here: say why (and what it got), go on
            print(json.dumps({"megatron_dynamic_engine": "failed", "cuda_graph_impl": graphs, "error": error_line(err),
                              **result}), flush=True)
            continue
        theirs = result["outputs"]
        rate = a.streams * a.tokens / result["seconds"]
        line = {"engine": "megatron_dynamic", "cuda_graph_impl": graphs, "seconds": round(result["seconds"], 3),
                "output_tokens_per_s": round(rate, 1), "ours_over_megatron": round(ours_rate / rate, 2),
                "megatron_output_lengths": sorted({len(t) for t in theirs}), **agreement(ours, theirs),
                "twin_max_logit_diff": result.get("twin_max_logit_diff")}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
