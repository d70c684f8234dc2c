"""EleutherAI's lm-evaluation-harness against the HTTP API, as a user runs it: its own CLI, `local-completions`
(loglikelihood and generate_until, tokenizing with the server's /tokenize) and `local-chat-completions`, on a
small task defined in `lm_eval_tasks/` (nothing can be downloaded here). Every value the harness logs is
checked against the ensemble's own answer for the same tokens."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import sentencepiece as spm

from client import GenerationClient

from .conftest import ROOT
from .test_api import MODEL, ensemble_scores

TASKS = ROOT / "tests" / "functional" / "lm_eval_tasks"
MAX_NEW = 12  # python_docs_generate.yaml's max_gen_toks
UNTIL = "\n\n"  # and its stop sequence


def run_harness(server, out: pathlib.Path, model: str, endpoint: str, tasks: str, *extra: str,
                model_args: str = "") -> dict:
    """``python -m lm_eval`` with the task folder; the logged samples of each task, by task name."""
    args = f"base_url=http://{server.api}{endpoint},model={MODEL},num_concurrent=1,max_retries=1,max_length=256"
    args += f",{model_args}" if model_args else ""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", tasks,
         "--include_path", str(TASKS), "--output_path", str(out), "--log_samples", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples


@pytest.fixture(scope="module")
def tokenizer():
    return spm.SentencePieceProcessor(model_file=str(ROOT / "demo_model" / "tokenizer.model"))


def expected_loglikelihood(server, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The harness's split (the whole text's tokens after those of the context), scored by the ensemble."""
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    scores = ensemble_scores(server, context + continuation, max_tokens=0, return_prompt_log_probs=True,
                             top_log_probs=1)
    assert len(scores["prompt_log_probs"]) == len(whole) - 1
    values = scores["prompt_log_probs"][start - 1:]  # the log-prob of token i sits at i - 1
    best = scores["prompt_top_log_probs"][start - 1:]
    return sum(values), all(v >= b - 1e-6 for v, b in zip(values, best))


def test_local_completions_scores_and_generates_as_the_ensemble_does(server, tokenizer, tmp_path):
    samples = run_harness(server, tmp_path, "local-completions", "/v1/completions",
                          "python_docs_choice,python_docs_generate", model_args="tokenizer_backend=remote")
    choice, generate = samples["python_docs_choice"], samples["python_docs_generate"]
    assert len(choice) == len(generate) == 6

    values = []
    for sample in choice:
        for request, response in zip(sample["arguments"].values(), sample["resps"]):
            loglikelihood, greedy = (json.loads(x.lower()) for x in response[0])
            expected, expected_greedy = expected_loglikelihood(server, tokenizer, request["arg_0"], request["arg_1"])
            assert loglikelihood == pytest.approx(expected, abs=1e-4), request
            assert greedy == expected_greedy, request
            values.append(loglikelihood)
    assert len(set(values)) == len(values), "every choice should score differently for this test to mean anything"

    with GenerationClient(server.grpc, "grpc") as ensemble:
        for sample in generate:
            context = sample["arguments"]["gen_args_0"]["arg_0"]
            text = ensemble.generate(context, max_tokens=MAX_NEW, temperature=0.0).text
            assert sample["resps"][0][0] == text.split(UNTIL)[0], context
    assert len({s["resps"][0][0] for s in generate}) > 1


def test_local_chat_completions_generates_from_the_chat_template(server, tmp_path):
    samples = run_harness(server, tmp_path, "local-chat-completions", "/v1/chat/completions",
                          "python_docs_generate", "--apply_chat_template")["python_docs_generate"]
    assert len(samples) == 6
    with GenerationClient(server.grpc, "grpc") as ensemble:
        for sample in samples:
            question = sample["doc"]["question"]
            # the default template (api/chat_template.py), written out: one "role: content" line, then "assistant:"
            text = ensemble.generate(f"user: {question}\nassistant:", max_tokens=MAX_NEW, temperature=0.0).text
            assert sample["resps"][0][0] == text.split(UNTIL)[0], question
