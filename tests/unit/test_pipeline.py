import numpy as np
import pytest

from preprocessing.params import InvalidRequest
from preprocessing.pipeline import GenerationFailed, Postprocessor, Preprocessor

CONTEXT = 64


def strings(*values):
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=object)


def test_preprocessing_pads_to_the_context_and_reports_lengths(tiny_tokenizer):
    pre = Preprocessor(tiny_tokenizer, CONTEXT)
    out = pre({"text_input": strings("Hello world", "A much longer prompt than the first"),
               "max_tokens": np.array([[4], [4]], np.int32)})
    assert out["INPUT_IDS"].shape == (2, CONTEXT)
    for row, text in enumerate(["Hello world", "A much longer prompt than the first"]):
        n = int(out["INPUT_LENGTH"][row, 0])
        assert tiny_tokenizer.decode(out["INPUT_IDS"][row, :n]) == text


@pytest.mark.parametrize(
    "values, field",
    [
        ({"text_input": strings(""), "max_tokens": np.array([[4]], np.int32)}, "text_input"),
        ({"text_input": strings(b"\xff"), "max_tokens": np.array([[4]], np.int32)}, "text_input"),
        ({"text_input": strings("hi"), "max_tokens": np.array([[0]], np.int32)}, "max_tokens"),
        ({"text_input": strings("hi"), "max_tokens": np.array([[4]], np.int32),
          "top_p": np.array([[2.0]], np.float32)}, "top_p"),
        ({"text_input": strings("word " * 80), "max_tokens": np.array([[1]], np.int32)}, "text_input"),
        ({"text_input": strings("a" * 1_000_000), "max_tokens": np.array([[1]], np.int32)}, "text_input"),  # size
        ({"text_input": strings("hi"), "max_tokens": np.array([[1]], np.int32),
          "stop_words": np.zeros((1, 0), object)}, "stop_words"),
    ],
)
def test_preprocessing_rejects_with_the_field_named(tiny_tokenizer, values, field):
    with pytest.raises(InvalidRequest) as err:
        Preprocessor(tiny_tokenizer, CONTEXT)(values)
    assert err.value.field == field


def test_add_bos_puts_the_end_of_document_token_first(tiny_tokenizer):
    pre = Preprocessor(tiny_tokenizer, CONTEXT)
    plain = pre({"text_input": strings("Hello world"), "max_tokens": np.array([[4]], np.int32)})
    values = {"text_input": strings("Hello world", ""), "max_tokens": np.array([[4], [4]], np.int32),
              "add_bos": np.array([[True], [True]])}
    out = pre(values)
    n = int(plain["INPUT_LENGTH"][0, 0])
    assert out["INPUT_LENGTH"][:, 0].tolist() == [n + 1, 1]  # an empty prompt is allowed with it
    assert out["INPUT_IDS"][0, : n + 1].tolist() == [tiny_tokenizer.eos_id, *plain["INPUT_IDS"][0, :n].tolist()]
    assert out["INPUT_IDS"][1, 0] == tiny_tokenizer.eos_id


def test_postprocessing_decodes_and_optionally_prefixes_the_prompt(tiny_tokenizer):
    prompt, new = tiny_tokenizer.encode("The for"), tiny_tokenizer.encode(" statement loops")
    values = {
        "INPUT_IDS": np.array([prompt + [0] * 5], np.int32), "INPUT_LENGTH": np.array([[len(prompt)]], np.int32),
        "OUTPUT_IDS": np.array([new + [0]], np.int32), "OUTPUT_LENGTH": np.array([[len(new)]], np.int32),
        "OUTPUT_LOG_PROBS": np.full((1, len(new) + 1), -0.5, np.float32), "ERROR": strings(""),
        "TEXT_INPUT": strings("The for"),
    }
    out = Postprocessor(tiny_tokenizer)(values)
    assert out["TEXT_OUTPUT"][0, 0].decode() == " statement loops"
    assert out["OUT_OUTPUT_LOG_PROBS"].shape == (1, 0)  # not asked for: empty
    values["EXCLUDE_INPUT_IN_OUTPUT"] = np.array([[False]])
    values["RETURN_LOG_PROBS"] = np.array([[True]])
    out = Postprocessor(tiny_tokenizer)(values)
    assert out["TEXT_OUTPUT"][0, 0].decode() == "The for statement loops"
    assert out["OUT_OUTPUT_LOG_PROBS"].tolist() == [[-0.5] * len(new)]


def test_postprocessing_raises_the_model_error(tiny_tokenizer):
    values = {"ERROR": strings("invalid input 'MAX_TOKENS' = 0: must be ...")}
    with pytest.raises(GenerationFailed) as err:
        Postprocessor(tiny_tokenizer)(values)
    assert err.value.invalid
    values = {"ERROR": strings("generation failed: boom")}
    with pytest.raises(GenerationFailed) as err:
        Postprocessor(tiny_tokenizer)(values)
    assert not err.value.invalid


def test_scores_carry_each_tokens_text_and_pad_across_rows(tiny_tokenizer):
    """The serving side's SCORES (texts read in place) become postprocessing's tensors, padded per batch."""
    from preprocessing.params import SamplingParams
    from preprocessing.pipeline import score_tensors
    from triton_backend.engine.generation import Generation
    from triton_backend.serving import scores

    prompt = tiny_tokenizer.encode("The class statement")
    generated = tiny_tokenizer.encode(" defines a new type")
    params = SamplingParams(max_tokens=4, return_prompt_log_probs=True, top_log_probs=2)
    g = Generation(prompt=prompt, params=params, tokens=generated, logprobs=[-1.0] * len(generated),
                   prompt_logprobs=[-2.0] * (len(prompt) - 1),
                   prompt_top=[([prompt[q + 1], 7], [-0.5, -0.9]) for q in range(len(prompt) - 1)],
                   top=[([t, 7], [-0.1, -0.2]) for t in generated])
    first = scores.scores(g, tiny_tokenizer)
    assert "".join(first["prompt_tokens"]) == "The class statement"
    assert "".join(first["output_tokens"]) == " defines a new type"
    assert [t[0][0] for t in first["prompt_top"]] == first["prompt_tokens"][1:]  # read where it stands
    later = scores.scores(g, tiny_tokenizer, start=2, prompt=False)
    assert later["output_tokens"] == first["output_tokens"][2:] and "prompt_tokens" not in later
    assert scores.merge(first, later)["output_tokens"] == first["output_tokens"] + later["output_tokens"]
    assert scores.scores(Generation(prompt=prompt, params=SamplingParams(max_tokens=1)), tiny_tokenizer) == {}
    out = score_tensors(np.array([[scores.encode(first)], [b""]], dtype=object), 2)
    n, m = len(prompt), len(generated)
    assert out["PROMPT_TOKENS"].shape == (2, n) and out["PROMPT_TOKENS"][1].tolist() == [b""] * n
    assert out["PROMPT_LOG_PROBS"].shape == (2, n - 1) and out["PROMPT_LOG_PROBS"][0].tolist() == [-2.0] * (n - 1)
    assert out["OUTPUT_TOP_LOG_PROBS"].shape == (2, m, 2) and out["OUTPUT_TOP_TOKENS"].shape == (2, m, 2)
    assert out["OUTPUT_TOP_LOG_PROBS"][0, 0].tolist() == pytest.approx([-0.1, -0.2])
    assert out["OUTPUT_TOKEN_IDS"][0].tolist() == generated and out["OUTPUT_TOKEN_IDS"][1].tolist() == [-1] * m
    assert out["PROMPT_TOKEN_IDS"][0].tolist() == prompt and out["PROMPT_TOKEN_IDS"].shape == (2, n)
    empty = score_tensors(np.array([[b""]], dtype=object), 1)
    assert all(v.size == 0 for v in empty.values())


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer"])
def test_special_token_texts_in_a_prompt_stay_text_unless_asked(tmp_path, tiny_tokenizer, kind):
    from preprocessing.tokenization import TokenizerSpec, build, load, load_path

    if kind == "SentencePieceTokenizer":
        tok = load(TokenizerSpec(kind, {"tokenizer_model": str(tiny_tokenizer.path)}))
    elif kind == "HuggingFaceTokenizer":
        tok = load_path(build.huggingface_directory(tmp_path, build.corpus()[:40], vocab_size=512))
    else:
        tok = load_path(build.gpt2_bpe(tmp_path, build.corpus()[:40], vocab_size=512))
    pre = Preprocessor(tok, CONTEXT)
    texts = sorted(tok.special_tokens)
    rows = {"text_input": strings(*texts), "max_tokens": np.ones((len(texts), 1), np.int32)}
    plain = pre(rows)
    parsed = pre({**rows, "add_special_tokens": np.ones((len(texts), 1), np.bool_)})
    for row, text in enumerate(texts):
        ids = plain["INPUT_IDS"][row, : plain["INPUT_LENGTH"][row, 0]].tolist()
        assert tok.special_tokens[text] not in ids[len(tok.leading):], text  # typed, it is text
        asked = parsed["INPUT_IDS"][row, : parsed["INPUT_LENGTH"][row, 0]].tolist()
        assert tok.special_tokens[text] in asked, text
