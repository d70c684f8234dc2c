"""Small tokenizers of every file format, trained from a corpus, for presets and tests (no downloads here).

- ``gpt2_bpe``: ``vocab.json`` + ``merges.txt`` as GPT-2 ships them (byte-level BPE, ``<|endoftext|>`` last).
- ``tiktoken_vocabulary``: Megatron's TikTokenizer JSON made from that BPE (the 256 bytes, then one entry per
  merge in merge order).
- ``huggingface_directory``: a Llama-3-style ``tokenizer.json`` (byte-level BPE, ``<|begin_of_text|>`` put first
  by the post-processor, chat special tokens) with a ``tokenizer_config.json`` naming BOS / EOS and a chat
  template.
"""

from __future__ import annotations

import base64
import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .byte_level import byte_decoder

GPT2_EOD = "<|endoftext|>"
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def corpus() -> list[str]:
    """The standard library's documentation topics (the demo model's corpus), always present offline."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _byte_level_bpe(texts: list[str], vocab_size: int, special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _vocab_and_merges(tok: Tokenizer) -> tuple[dict[str, int], list[str]]:
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return model["vocab"], merges


def gpt2_bpe(out: pathlib.Path, texts: list[str] | None = None, vocab_size: int = 2048) -> pathlib.Path:
    """``out/vocab.json`` and ``out/merges.txt`` in GPT-2's format; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges(_byte_level_bpe(texts or corpus(), vocab_size - 1, []))
    vocab[GPT2_EOD] = len(vocab)  # GPT-2 keeps its end of document as the last entry
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def tiktoken_vocabulary(path: pathlib.Path, gpt2_dir: pathlib.Path) -> pathlib.Path:
    """Megatron's TikTokenizer JSON from a GPT-2-format BPE: ranks are merge order, the bytes first."""
    decoder = byte_decoder()
    merges = (gpt2_dir / "merges.txt").read_text().splitlines()[1:]
    entries = [bytes([b]) for b in range(256)]
    seen = set(entries)
    for line in merges:
        if not line:
            continue
        token = bytes(decoder[c] for c in line.replace(" ", ""))
        if token not in seen:
            seen.add(token)
            entries.append(token)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                                 "token_str": t.decode("utf-8", errors="replace")} for i, t in enumerate(entries)]))
    return path


def huggingface_directory(out: pathlib.Path, texts: list[str] | None = None, vocab_size: int = 2048) -> pathlib.Path:
    """A Llama-3-style HuggingFace tokenizer directory; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_bpe(texts or corpus(), vocab_size, LLAMA3_SPECIAL)
    bos = LLAMA3_SPECIAL[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
              "model_max_length": 131072, "clean_up_tokenization_spaces": False,
              "chat_template": LLAMA3_CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
