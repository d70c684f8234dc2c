"""Every tokenizer type gives Megatron's ids: held to the libraries Megatron training calls on the same files
(transformers, sentencepiece, tiktoken, megatron.core's classes), and decodes safely piece by piece."""

import json

import pytest

from preprocessing.detokenize import REPLACEMENT, TextTracker
from preprocessing.tokenization import TokenizerError, TokenizerSpec, build, load, load_path, resolve

TEXTS = ["Hello world", "  two  spaces\n\nnew lines\ttab", "emoji 🙂 and CJK 漢字", "def f(x):\n    return x",
         "Ünïcödé façade — naïve “quotes” 12345 67", "\u00e9\u0301 combining, RTL שלום, zero\u200bwidth"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_files")
    texts = build.corpus()[:120]
    gpt2 = build.gpt2_bpe(root / "gpt2", texts, vocab_size=1024)
    return {"gpt2": gpt2, "hf": build.huggingface_directory(root / "hf", texts, vocab_size=1024),
            "tiktoken": build.tiktoken_vocabulary(root / "tik" / "vocab.json", gpt2)}


def corpus_samples():
    return [t[:300] for t in build.corpus()[200:260]] + TEXTS


# --- the ids ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_demo_style_tokenizer_round_trips_any_text(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_gpt_sentencepiece_ids_are_the_models_own(tiny_tokenizer):
    assert tiny_tokenizer.type_name == "GPTSentencePieceTokenizer"
    assert tiny_tokenizer.eos_id == 2 and tiny_tokenizer.pad_id == 3 and tiny_tokenizer.vocab_size == 400
    assert tiny_tokenizer.encode("Hello world") == tiny_tokenizer.sp.encode("Hello world")


def test_sentencepiece_tokenizer_appends_megatrons_special_tokens(tiny_tokenizer):
    tok = load(TokenizerSpec("SentencePieceTokenizer", {"tokenizer_model": str(tiny_tokenizer.path)}))
    # <CLS> <SEP> <EOD> <MASK> after the 400 pieces; the model's <pad> <s> </s> keep their ids
    assert tok.special_tokens == {"<CLS>": 400, "<SEP>": 401, "<EOD>": 402, "<MASK>": 403, "<pad>": 3, "<s>": 1,
                                  "</s>": 2}
    assert tok.vocab_size == 404 and tok.eos_id == 402 and tok.pad_id == 3 and tok.bos_id == 1
    for text in TEXTS:
        assert tok.encode(text) == tiny_tokenizer.sp.encode(text)
    assert tok.encode("a<EOD>b", parse_special=True) == [*tiny_tokenizer.sp.encode("a"), 402,
                                                          *tiny_tokenizer.sp.encode("b")]
    assert tok.decode([*tok.encode("hi"), 402]) == "hi"
    assert tok.decode([*tok.encode("hi"), 402], skip_special=False) == "hi<EOD>"


def test_sentencepiece_without_pad_gets_megatrons_pad(dummy_prefix_tokenizer):
    tok = load(TokenizerSpec("SentencePieceTokenizer", {"tokenizer_model": str(dummy_prefix_tokenizer.path)}))
    assert tok.special_tokens["<PAD>"] == tok.pad_id == 404  # the model has no pad: Megatron adds <PAD> last


def test_llama2_puts_bos_first_and_ends_on_eos(dummy_prefix_tokenizer):
    tok = load(TokenizerSpec("Llama2Tokenizer", {"tokenizer_model": str(dummy_prefix_tokenizer.path)}))
    sp = dummy_prefix_tokenizer.sp
    assert tok.encode("Hello world") == [sp.bos_id(), *sp.encode("Hello world")]
    assert tok.encode("world", leading=False) == sp.encode("world")  # a stop or bad word inside a text
    assert tok.eos_id == sp.eos_id() and tok.vocab_size == sp.get_piece_size()


def test_gpt2_bpe_matches_transformers(files):
    from transformers import GPT2Tokenizer

    ours = load_path(files["gpt2"])
    theirs = GPT2Tokenizer(str(files["gpt2"] / "vocab.json"), str(files["gpt2"] / "merges.txt"))
    assert ours.type_name == "GPT2BPETokenizer" and ours.bos_id is None
    assert ours.eos_id == theirs.convert_tokens_to_ids("<|endoftext|>") == ours.vocab_size - 1
    for text in corpus_samples() + ["end <|endoftext|> of it"]:
        # Megatron's GPT-2 tokenizer knows no special tokens: their texts are text
        assert ours.encode(text) == theirs(text, split_special_tokens=True).input_ids, text
        assert ours.encode(text, parse_special=True) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text)) == text


def test_huggingface_matches_transformers_autotokenizer(files):
    from transformers import AutoTokenizer

    ours, theirs = load_path(files["hf"]), AutoTokenizer.from_pretrained(str(files["hf"]))
    assert (ours.eos_id, ours.bos_id, ours.vocab_size) == (theirs.eos_token_id, theirs.bos_token_id, len(theirs))
    assert ours.leading == (theirs.bos_token_id,)  # its post-processor puts BOS first, as Megatron's tokenize does
    for text in corpus_samples() + ["user text<|eot_id|> tail<|begin_of_text|>"]:
        assert ours.encode(text, parse_special=True) == theirs(text).input_ids, text
        assert ours.encode(text) == theirs(text, split_special_tokens=True).input_ids, text
    # a text that writes BOS itself gets no second one (transformers would put two)
    assert ours.encode("<|begin_of_text|>hi", parse_special=True) == theirs("<|begin_of_text|>hi").input_ids[1:]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    from api.chat_template import ChatTemplate

    rendered = ChatTemplate(None, ours).render(messages)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template writes BOS; read with special tokens, the prompt gets no second one
    expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ours.encode(rendered, parse_special=True) == list(expected["input_ids"])


def test_tiktokenizer_matches_megatron_core(files):
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import SPECIAL_TOKENS, TikTokenTokenizer

    size = 1000 + len(json.loads(files["tiktoken"].read_text()))
    ours = load(resolve({"tokenizer_type": "TikTokenizer", "tokenizer_model": str(files["tiktoken"]),
                         "tiktoken_pattern": "v2", "vocab_size": size}))
    # megatron.core's class needs its seven special names; training's default is three: ordinary text agrees
    theirs = TikTokenTokenizer(str(files["tiktoken"]), special_tokens=list(SPECIAL_TOKENS), num_special_tokens=1000,
                               pattern="v2", vocab_size=size)
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0) and ours.vocab_size == size
    for text in corpus_samples():
        ids = ours.encode(text)
        assert ids == theirs.text_to_ids(text), text
        assert min(ids) >= 1000 and ours.decode(ids) == text
    assert ours.encode("a</s>", parse_special=True)[-1] == 2 and 2 not in ours.encode("a</s>")


def test_tiktoken_segments_like_the_gpt2_bpe_it_came_from(files):
    """Two libraries, one vocabulary: the same bytes per token (the v1 pattern splits like GPT-2's on prose)."""
    gpt2 = load_path(files["gpt2"])
    tik = load(resolve({"tokenizer_type": "TikTokenizer", "tokenizer_model": str(files["tiktoken"]),
                        "vocab_size": 1000 + len(json.loads(files["tiktoken"].read_text()))}))
    for text in ["the quick brown fox", "Hello world, again"]:
        assert [gpt2.decode([i]) for i in gpt2.encode(text)] == [tik.decode([i]) for i in tik.encode(text)]


def test_null_tokenizer_matches_megatron_core():
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    ours, theirs = load(TokenizerSpec("NullTokenizer", vocab_size=50)), NullTokenizer(50)
    assert ours.encode("1 2 49") == theirs.text_to_ids("1 2 49") == [1, 2, 49]
    assert ours.eos_id == theirs.eod == 50 and ours.vocab_size == theirs.vocab_size == 51
    assert ours.decode([3, 4]) == theirs.ids_to_text([3, 4])


# --- incremental text ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "hf", "tiktoken", "sentencepiece"])
def test_streamed_text_never_splits_a_character(files, tiny_tokenizer, kind):
    tok = {"gpt2": lambda: load_path(files["gpt2"]), "hf": lambda: load_path(files["hf"]),
           "sentencepiece": lambda: tiny_tokenizer,
           "tiktoken": lambda: load(resolve({"tokenizer_type": "TikTokenizer", "tokenizer_model": str(
               files["tiktoken"]), "vocab_size": 1000 + len(json.loads(files["tiktoken"].read_text()))}))}[kind]()
    text = "Grüße 🙂🙂 漢字かな 🎉 naïve — ok"
    ids = tok.encode(text, leading=False)
    tracker, sent = TextTracker(tok, tok.encode("Say:")), ""
    for token in ids:
        tracker.add(token)
        delta = tracker.text[len(sent): tracker.stable_length(False)]
        assert REPLACEMENT not in delta
        sent += delta
    sent += tracker.final_text[len(sent):]
    assert sent == tok.decode(ids) == text


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "dummy_prefix_tokenizer"])
@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_continuation_matches_decoding_the_whole_sequence(request, fixture, split):
    tok = request.getfixturevalue(fixture)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. A for loop")
    prompt, new = ids[:split], ids[split:]
    assert tok.decode(prompt) + tok.decode_continuation(prompt, new) == tok.decode(ids)


def test_dummy_prefix_keeps_the_leading_space_of_a_continuation(dummy_prefix_tokenizer):
    tok = dummy_prefix_tokenizer
    prompt, new = tok.encode("Hello"), tok.encode("world")
    assert tok.decode(new) == "world"  # decoded alone, sentencepiece drops the space...
    assert tok.decode_continuation(prompt, new) == " world"  # ...which follows "Hello" in the sequence


# --- which tokenizer, from the checkpoint's args ------------------------------------------------------------------
def test_recorded_paths_that_moved_are_found_beside_the_checkpoint(tmp_path, tiny_tokenizer):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "tokenizer.model").write_bytes(tiny_tokenizer.path.read_bytes())
    spec = resolve({"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": "/lustre/train/tokenizer.model"},
                   checkpoint=tmp_path / "ckpt")
    assert spec.files["tokenizer_model"] == str((tmp_path / "tokenizer.model").resolve())


def test_a_missing_file_names_the_type_the_arg_and_the_paths(tmp_path):
    with pytest.raises(TokenizerError) as err:
        resolve({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/train/gpt2-vocab.json",
                 "merge_file": "/train/gpt2-merges.txt"}, checkpoint=tmp_path)
    message = str(err.value)
    assert "GPT2BPETokenizer" in message and "vocab_file" in message and "/train/gpt2-vocab.json" in message
    assert str(tmp_path / "gpt2-vocab.json") in message and "TOKENIZER" in message
    with pytest.raises(TokenizerError, match="HuggingFaceTokenizer.*tokenizer_model.*meta-llama"):
        resolve({"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "meta-llama/Meta-Llama-3-8B"})


def test_overrides_replace_the_recorded_paths_and_type(files, tiny_tokenizer):
    recorded = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/nowhere/v.json", "merge_file": "/nowhere/m"}
    spec = resolve(recorded, files["gpt2"])
    assert spec.files["vocab_file"].endswith("vocab.json") and spec.files["merge_file"].endswith("merges.txt")
    assert resolve(recorded, files["hf"], "HuggingFaceTokenizer").type == "HuggingFaceTokenizer"
    assert resolve(None, tiny_tokenizer.path).type == "GPTSentencePieceTokenizer"  # a bare .model: raw ids
    assert resolve(None, files["hf"]).type == "HuggingFaceTokenizer"
    with pytest.raises(TokenizerError, match="tokenizer_type 'BertWordPieceCase' is not served"):
        resolve({"tokenizer_type": "BertWordPieceCase"})
    with pytest.raises(TokenizerError, match="TOKENIZER=.*does not exist"):
        resolve(recorded, "/no/such/dir")


def test_broken_files_are_refused_with_the_reason(tmp_path):
    bad = tmp_path / "v.json"
    bad.write_text(json.dumps([{"rank": 0, "token_bytes": "AQ==", "token_str": ""}]))
    with pytest.raises(TokenizerError, match="entry 0 must be the single byte 0"):
        load(resolve({"tokenizer_type": "TikTokenizer", "tokenizer_model": str(bad), "vocab_size": 1001}))
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load(TokenizerSpec("GPTSentencePieceTokenizer", {"tokenizer_model": str(bad)}))
    with pytest.raises(TokenizerError, match="NullTokenizer needs vocab_size"):
        load(TokenizerSpec("NullTokenizer"))
