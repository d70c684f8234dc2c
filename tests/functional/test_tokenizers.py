"""Checkpoints as Megatron training saved them: the tokenizer their args name, found where it is, on every way in.

The ``llama3`` preset (grouped-query attention, Llama-3.1's RoPE scaling, a Llama-3-style HuggingFace tokenizer)
is written, then moved: the path its args record no longer exists, as on a serving machine, and the server
finds the tokenizer beside the checkpoint. Every route gives transformers' ids and the model's own chat
template, and the served model transformers' greedy text and log-probs. A checkpoint whose tokenizer files are
nowhere is refused at start, naming them, with no rank left waiting.
"""

from __future__ import annotations

import shutil
import time

import openai
import pytest
import requests

from client import GenerationClient
from preprocessing.tokenization import build

from .conftest import start_server, stop_server
from .test_tensor_parallel import make_checkpoint

MODEL = "megatron-gpt"
TEXTS = ["Grüße 🙂 from the", "user text <|eot_id|> more", "def f(x):\n    return"]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3")
    trained = make_checkpoint(root / "at_training", 1, "--random", "llama3", "--init-std", "0.2")
    moved = root / "here"
    shutil.move(trained, moved)  # the recorded tokenizer path is gone
    return moved, moved / "tokenizer"


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory, hf_files):
    ckpt, _ = hf_files
    s = start_server(tmp_path_factory.mktemp("hf_server"), CHECKPOINT=str(ckpt))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def reference(hf_files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_files[1]))


def test_tokenize_gives_transformers_ids(hf_server, reference):
    base = f"http://{hf_server.api}"
    for text in TEXTS:
        plain = requests.post(f"{base}/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]
        special = requests.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": True},
                                timeout=30).json()["tokens"]
        assert plain == reference(text, split_special_tokens=True).input_ids  # a typed <|eot_id|> stays text
        assert special == reference(text).input_ids
    info = requests.get(f"{base}/tokenizer_info", timeout=30).json()
    assert info["tokenizer_class"] == "HuggingFaceTokenizer" and info["eos_token"] == "<|eot_id|>"
    assert info["chat_template"] == reference.chat_template


def test_the_ensembles_count_and_stream_with_the_checkpoints_tokenizer(hf_server, reference):
    with GenerationClient(hf_server.grpc, "grpc") as client:
        for text in TEXTS:
            unary = client.generate(text, max_tokens=16, temperature=0, end_id=-1)
            assert unary.num_input_tokens == len(reference(text, split_special_tokens=True).input_ids)
            deltas = [r.text for r in client.stream(text, max_tokens=16, temperature=0, end_id=-1)]
            assert "".join(deltas) == unary.text and unary.num_output_tokens == 16
            # a streamed character is never split (a random model may still write bytes that are no character)
            assert sum(d.count("\ufffd") for d in deltas) == unary.text.count("\ufffd")
            parsed = client.generate(text, max_tokens=1, add_special_tokens=True)
            assert parsed.num_input_tokens == len(reference(text).input_ids)


def test_chat_uses_the_tokenizers_own_template(hf_server, reference):
    api = openai.OpenAI(base_url=f"http://{hf_server.api}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a loop."}]
    r = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert r.usage.prompt_tokens == len(expected["input_ids"])  # one BOS, control tokens read as such
    c = api.completions.create(model=MODEL, prompt=[int(i) for i in expected["input_ids"]], max_tokens=8,
                               temperature=0)
    assert c.choices[0].text == r.choices[0].message.content  # the same ids through the completions route


def test_the_served_model_gives_transformers_greedy_text_and_log_probs(hf_server, hf_files, reference):
    import torch

    from tools.hf_reference import load_hf

    hf, _ = load_hf(hf_files[0])  # LlamaForCausalLM with rope_type llama3, on the checkpoint's weights
    api = openai.OpenAI(base_url=f"http://{hf_server.api}/v1", api_key="unused", max_retries=0, timeout=120)
    for text in TEXTS[:2]:
        ids = reference(text, split_special_tokens=True).input_ids  # as the completions route reads a prompt
        out = list(ids)
        with torch.no_grad():  # greedy by transformers' forward (its generate() drifts from it under llama3 RoPE)
            for _ in range(12):
                out.append(int(hf(torch.tensor([out])).logits[0, -1].argmax()))
            scores = torch.log_softmax(hf(torch.tensor([out])).logits[0, len(ids) - 1:-1].float(), dim=-1)
        new = out[len(ids):]
        served = api.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0, logprobs=0,
                                        extra_body={"ignore_eos": True})
        assert served.choices[0].text == reference.decode(new, skip_special_tokens=True)
        want = [float(scores[i, t]) for i, t in enumerate(new)]
        assert max(abs(a - b) for a, b in zip(served.choices[0].logprobs.token_logprobs, want)) < 1e-3


def test_odd_prompts_get_their_answer_or_a_named_400(hf_server, reference):
    import random

    base = f"http://{hf_server.api}/v1/completions"
    rng = random.Random(0)

    def complete(prompt_json: str):
        body = f'{{"model": "{MODEL}", "max_tokens": 4, "temperature": 0, "prompt": {prompt_json}}}'
        return requests.post(base, data=body.encode(), headers={"content-type": "application/json"}, timeout=60)

    lone = complete('"a \\ud800 b"')
    assert lone.status_code == 400 and lone.json()["error"]["param"] == "prompt"
    huge = complete(f'"{"word " * 20_000}"')
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "prompt"
    for _ in range(5):  # random bytes read as text: any code point
        text = bytes(rng.randrange(256) for _ in range(200)).decode("latin-1")
        r = requests.post(base, json={"model": MODEL, "prompt": text, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(
            reference(text, split_special_tokens=True).input_ids)
    for special in sorted(reference.all_special_tokens + ["<|start_header_id|>", "<|end_header_id|>"]):
        r = requests.post(base, json={"model": MODEL, "prompt": special, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text  # typed, a special token is text
        assert r.json()["usage"]["prompt_tokens"] == len(reference(special, split_special_tokens=True).input_ids)


def test_a_gpt2_bpe_checkpoint_serves_transformers_gpt2_text_at_tp2(tmp_path):
    """Megatron's GPT-345M recipe in small: GPT2BPETokenizer recorded with its vocab and merges, GPT-2 layers."""
    import torch
    from transformers import GPT2Tokenizer

    from tools.hf_reference import load_hf

    files = build.gpt2_bpe(tmp_path / "gpt2", build.corpus()[:200], vocab_size=1024)
    ckpt = make_checkpoint(tmp_path / "ckpt", 2, "--random", "gpt", "--init-std", "0.2", "--tokenizer-type",
                           "GPT2BPETokenizer", "--tokenizer", str(files))
    reference = GPT2Tokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    hf, _ = load_hf(ckpt)
    server = start_server(tmp_path / "srv", TP="2", CHECKPOINT=str(ckpt))
    try:
        api = openai.OpenAI(base_url=f"http://{server.api}/v1", api_key="unused", max_retries=0, timeout=120)
        for text in ["The for statement", "Grüße <|endoftext|> 🙂"]:
            ids = reference(text, split_special_tokens=True).input_ids
            out = list(ids)
            with torch.no_grad():
                for _ in range(10):
                    out.append(int(hf(torch.tensor([out])).logits[0, -1, :len(reference)].argmax()))
            served = api.completions.create(model=MODEL, prompt=text, max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert served.usage.prompt_tokens == len(ids)  # no BOS; the typed <|endoftext|> is text
            assert served.choices[0].text == reference.decode(out[len(ids):])
    finally:
        stop_server(server)


def test_a_checkpoint_whose_tokenizer_is_nowhere_is_refused_at_start(tmp_path):
    files = build.gpt2_bpe(tmp_path / "gpt2", build.corpus()[:60], vocab_size=512)
    ckpt = make_checkpoint(tmp_path / "ckpt", 1, "--random", "gpt", "--tokenizer-type", "GPT2BPETokenizer",
                           "--tokenizer", str(files))
    shutil.rmtree(files)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="server exited"):
        start_server(tmp_path / "srv", TP="2", CHECKPOINT=str(ckpt))
    assert time.monotonic() - started < 120  # no rank waits for another
    log = (tmp_path / "srv" / "server.log").read_text()
    assert "configuration error: tokenizer GPT2BPETokenizer: vocab_file not found" in log
    assert str(files / "vocab.json") in log and "TokenizerError" not in log  # a message, not our traceback
