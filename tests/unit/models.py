"""Small random Megatron GPTs for the engine tests, and the reference they are checked against.

Megatron's default init (std 0.02) gives a model that repeats the last prompt token whatever came before it, so a
cache that loses or misplaces the context still "matches" an uncached run. These models use std 0.2, and
``assert_uses_the_whole_context`` proves in each test module that their greedy text depends on every prompt token.
"""

from __future__ import annotations

import dataclasses

import torch

from triton_backend.model.architecture import GPTArchitecture
from triton_backend.model.gpt import build_model, init_parallel

ARCH = GPTArchitecture(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                       padded_vocab_size=128, max_position_embeddings=64, seq_length=64)
# The llama family: rotary positions applied per row, RMSNorm, SwiGLU, grouped-query attention, untied output.
ROTARY_ARCH = GPTArchitecture(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                              ffn_hidden_size=96, padded_vocab_size=128, max_position_embeddings=64, seq_length=64,
                              position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                              add_bias_linear=False, untie_embeddings_and_output_weights=True)
# The fields newer Megatron models record: qk-norm, Llama-3.1's RoPE scaling, interleaved rotary; and squared ReLU.
FIELDS_ARCH = dataclasses.replace(ROTARY_ARCH, qk_layernorm=True, use_rope_scaling=True, rotary_interleaved=True)
SQUARED_RELU_ARCH = dataclasses.replace(ARCH, squared_relu=True)
ZERO_CENTERED_ARCH = dataclasses.replace(ARCH, layernorm_zero_centered_gamma=True)
# With a sentencepiece tokenizer of up to 512 pieces (the tests' tiny one has 400), for stop and bad words.
TEXT_ARCH = GPTArchitecture(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                            padded_vocab_size=512, max_position_embeddings=128, seq_length=128)
VOCAB, EOS = 120, 2
INIT_STD = 0.2


def context_model(arch: GPTArchitecture = ARCH, seed: int = 0):
    """A random model whose greedy continuation depends on the whole prompt (checked by the caller)."""
    init_parallel(1, "cpu")
    torch.manual_seed(seed)
    return build_model(arch, init_method_std=INIT_STD).eval()


def greedy_uncached(model, prompt: list[int], n: int, vocab: int = VOCAB) -> list[int]:
    """The reference: the whole sequence through Megatron's plain causal forward at every token, no cache."""
    return greedy_uncached_with_logprobs(model, prompt, n, vocab)[0]


def greedy_uncached_with_logprobs(model, prompt: list[int], n: int, vocab: int = VOCAB):
    """The reference tokens and each one's log-probability under the model (log-softmax over the vocabulary)."""
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, -1, :vocab]
            ids.append(int(logits.argmax()))
            logprobs.append(float(torch.log_softmax(logits.float(), dim=0)[ids[-1]]))
    return ids[len(prompt):], logprobs


def assert_uses_the_whole_context(model, vocab: int = VOCAB) -> None:
    """Prompts that differ only in their first token, or only in their last, continue differently; and the
    continuation is not the last token repeated."""
    base = [5, 17, 33, 4, 90, 61, 12]
    first_changed = [6, *base[1:]]
    last_changed = [*base[:-1], 13]
    runs = [greedy_uncached(model, p, 8, vocab) for p in (base, first_changed, last_changed)]
    assert runs[0] != runs[1], "the first prompt token does not change the text: the model ignores the context"
    assert runs[0] != runs[2]
    assert len(set(runs[0])) > 2 and runs[0] != [base[-1]] * 8


def wait_until(condition, timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Poll ``condition()`` until it holds; fail the test (instead of hanging it) after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s:g} s")
        time.sleep(0.005)


def run_two_ranks(target, timeout_s: float = 240):
    """Run ``target(rank, port, queue)`` as the two ranks of a TP=2 job (spawned processes, gloo) and return what
    rank 0 puts on the queue; both ranks must exit 0."""
    import torch.multiprocessing as mp

    from tools.ports import free_ports

    (port,) = free_ports(1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=timeout_s)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return result
