"""Build the embedded demo model: a sentencepiece tokenizer and a small GPT trained on ``pydoc_data.topics``.

    python -m tools.demo_model --out demo_model

Deterministic for a given seed; a few minutes on two CPU cores. Writes ``<out>/tokenizer.model`` and a
Megatron torch_dist checkpoint in ``<out>/checkpoint`` whose ``args`` describe the model.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import random
import time

import torch

from triton_backend import checkpoints
from triton_backend.model.architecture import GPTArchitecture
from triton_backend.model.gpt import build_model, init_parallel

# GPT-2 style: learned absolute positions, LayerNorm, GeLU, tied embeddings. Eight heads so that every
# tensor-parallel size up to 8 divides the model.
DEMO = dict(num_layers=4, hidden_size=256, num_attention_heads=8, ffn_hidden_size=1024, vocab=4096, seq_length=256)


def corpus() -> list[str]:
    """The standard library's documentation topics, always present offline."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def train_tokenizer(texts: list[str], out: pathlib.Path, vocab_size: int, seed: int) -> pathlib.Path:
    import sentencepiece as spm

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)  # sentencepiece samples input sentences; a fixed order keeps it stable
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # any UTF-8 text (emoji, CJK) encodes and decodes losslessly
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "    "],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def batches(ids: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=generator)
        window = torch.stack([ids[s : s + length + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def loss_of(model, tokens, targets):
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    logits = model(tokens, positions, None)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_model", type=pathlib.Path)
    parser.add_argument("--seed", default=1234, type=int)
    parser.add_argument("--steps", default=400, type=int)
    parser.add_argument("--batch", default=8, type=int)
    parser.add_argument("--layers", default=DEMO["num_layers"], type=int)
    parser.add_argument("--hidden", default=DEMO["hidden_size"], type=int)
    parser.add_argument("--heads", default=DEMO["num_attention_heads"], type=int)
    parser.add_argument("--vocab", default=DEMO["vocab"], type=int)
    parser.add_argument("--seq-length", default=DEMO["seq_length"], type=int)
    parser.add_argument("--lr", default=2e-3, type=float)
    a = parser.parse_args()

    started = time.time()
    torch.manual_seed(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    texts = corpus()
    tok_path = train_tokenizer(texts, a.out, a.vocab, a.seed)

    from preprocessing.tokenization import load_path

    tok = load_path(tok_path)
    ids = torch.tensor([i for text in texts for i in tok.encode(text) + [tok.eos_id]], dtype=torch.long)
    split = int(len(ids) * 0.95)
    train_ids, valid_ids = ids[:split], ids[split:]

    arch = GPTArchitecture(
        num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
        ffn_hidden_size=4 * a.hidden, padded_vocab_size=tok.vocab_size,
        max_position_embeddings=a.seq_length, seq_length=a.seq_length,
    )
    init_parallel(1, "cpu")
    model = build_model(arch)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, a.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)) + 0.05)
    )
    data = batches(train_ids, a.batch, a.seq_length, torch.Generator().manual_seed(a.seed))
    model.train()
    for step in range(a.steps):
        tokens, targets = next(data)
        loss = loss_of(model, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - started:6.1f}s", flush=True)

    model.eval()
    with torch.no_grad():
        windows = valid_ids[: (len(valid_ids) - 1) // a.seq_length * a.seq_length + 1]
        tokens = windows[:-1].view(-1, a.seq_length)
        targets = windows[1:].view(-1, a.seq_length)
        valid_loss = sum(loss_of(model, t[None], g[None]).item() for t, g in zip(tokens, targets)) / len(tokens)

    args = arch.to_megatron_args(
        # raw sentencepiece ids, documents ending on its </s>: what the model was trained on above
        tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(tok_path.resolve()),
        tensor_model_parallel_size=1, make_vocab_size_divisible_by=128, params_dtype=torch.float32, seed=a.seed,
        train_iters=a.steps, global_batch_size=a.batch, lr=a.lr,
    )
    checkpoints.save(model, args, a.out / "checkpoint", a.steps)
    report = {
        "parameters": params, "validation_loss": round(valid_loss, 4), "train_steps": a.steps,
        "tokens_per_step": a.batch * a.seq_length, "build_seconds": round(time.time() - started, 1),
        "corpus_tokens": len(ids), "seed": a.seed,
    }
    (a.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
