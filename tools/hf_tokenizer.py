"""The server's sentencepiece model as a Hugging Face tokenizer directory, for clients that only take one
(genai-perf counts tokens with it). Run with a Python that has ``tokenizers`` and ``transformers``:

    .venv-genai-perf/bin/python tools/hf_tokenizer.py demo_model/tokenizer.model OUT_DIR

transformers 5 no longer converts a sentencepiece file by itself (its converter needs a protobuf newer than
tritonclient 2.50 allows), so the BPE model is rebuilt here from sentencepiece's own API: the vocabulary by
id, and the merges ranked by the id of the piece they make. It checks itself: every text of the demo corpus
must encode to the same ids as sentencepiece gives, or it exits non-zero.
"""

from __future__ import annotations

import sys

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def convert(model_file: str) -> PreTrainedTokenizerFast:
    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        merges += [(i, vocab[piece[:k]], piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]
    merges.sort()  # a BPE merge's rank is the id of the piece it makes (sentencepiece orders pieces by score)
    bpe = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], byte_fallback=True, fuse_unk=True,
                     unk_token=sp.id_to_piece(sp.unk_id()))
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "▁")  # the demo model: no dummy prefix, spaces kept as they are
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")  # "\n" is a user-defined piece
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = {name: sp.id_to_piece(i) for name, i in
               (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                ("pad_token", sp.pad_id())) if i >= 0}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def main() -> int:
    model_file, out = sys.argv[1:3]
    fast = convert(model_file)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    from pydoc_data.topics import topics  # the demo model's corpus

    texts = [topics[k] for k in sorted(topics)]
    differ = [t[:40] for t in texts if sp.encode(t) != fast.encode(t, add_special_tokens=False)]
    if differ:
        print(f"the converted tokenizer differs from sentencepiece on {len(differ)} of {len(texts)} texts, "
              f"e.g. {differ[0]!r}", file=sys.stderr)
        return 1
    fast.save_pretrained(out)
    print(f"{out}: same ids as sentencepiece on all {len(texts)} texts of the demo corpus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
