"""genai-perf (NVIDIA's LLM benchmark, over perf_analyzer) against one server: the streaming ensemble over
Triton's gRPC (TensorRT-LLM's tensor names), then ``/v1/completions`` and ``/v1/chat/completions`` over HTTP,
``--rounds`` rounds alternating (``make bench-genai-perf``):

    .venv/bin/python tools/genai_perf.py [--concurrency 16] [--tokens 64] [--requests 64] [--rounds 2]

genai-perf pulls in transformers, pandas, plotly and more, so it lives in a venv of its own
(``.venv-genai-perf``, made by the Makefile target); it needs a Hugging Face tokenizer directory, which
``tools/hf_tokenizer.py`` builds from the demo model's sentencepiece file. Every request has a 64-token
synthetic prompt and generates exactly ``--tokens`` tokens (``min_length`` on the ensemble, vLLM's
``min_tokens`` on the API). Prints each run's output tokens/s, time to first token and inter-token latency
(p50), genai-perf's own figures, and the API's ratios to the ensemble's in the same round.

On the 2-core development machine genai-perf and perf_analyzer share the CPU with the server they measure,
so the absolute figures are lower than ``make bench-api``'s (whose clients cost less); compare within a run.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench import start_server  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-genai-perf"
MODEL = "megatron-gpt"  # the API's default MODEL_NAME
TARGETS = {  # name -> genai-perf's arguments (the url is added per run)
    "ensemble_stream (gRPC)": ["-m", "ensemble_stream", "--endpoint-type", "kserve", "--backend", "tensorrtllm",
                               "--output-tokens-mean-deterministic"],
    "/v1/completions": ["-m", MODEL, "--endpoint-type", "completions"],
    "/v1/chat/completions": ["-m", MODEL, "--endpoint-type", "chat"],
}


def profile(target: str, url: str, tokenizer: pathlib.Path, out: pathlib.Path, a) -> dict[str, float]:
    """One genai-perf run; its p50 latencies (ms) and output tokens/s from the CSV it exports."""
    args = [str(VENV / "bin" / "genai-perf"), "profile", *TARGETS[target], "--url", url, "--streaming",
            "--tokenizer", str(tokenizer), "--concurrency", str(a.concurrency), "--synthetic-input-tokens-mean", "64",
            "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(a.tokens), "--num-prompts", "100",
            "--request-count", str(a.requests), "--warmup-request-count", str(a.concurrency),  # perf_analyzer 2.50
            "--artifact-dir", str(out)]                                     # hangs with fewer warm-ups
    if not target.startswith("ensemble"):
        args += ["--extra-inputs", f"min_tokens:{a.tokens}"]
    runtime = VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / \
        "nvidia" / "cuda_runtime" / "lib"
    env = {**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", "LD_LIBRARY_PATH": str(runtime)}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"genai-perf failed for {target}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    (export,) = out.rglob("profile_export_genai_perf.csv")
    figures = {}
    with export.open() as f:
        for row in csv.reader(f):
            if len(row) > 8 and row[0] in ("Time To First Token (ms)", "Inter Token Latency (ms)"):
                figures[row[0].split(" (")[0]] = float(row[8].replace(",", ""))  # the p50 column
            elif len(row) == 2 and row[0] == "Output Token Throughput (tokens/sec)":
                figures["tokens/s"] = float(row[1].replace(",", ""))
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    a = parser.parse_args()
    if not (VENV / "bin" / "genai-perf").exists():
        print(f"{VENV} is missing: run `make bench-genai-perf`, which makes it", file=sys.stderr)
        return 1
    work = pathlib.Path(tempfile.mkdtemp(prefix="genai-perf-"))
    tokenizer = work / "tokenizer"
    subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tools" / "hf_tokenizer.py"),
                    str(ROOT / "demo_model" / "tokenizer.model"), str(tokenizer)], check=True)
    proc, grpc_url, _, _, api_url = start_server({"DEVICE": os.environ.get("DEVICE", "cpu")}, all_urls=True, api=True)
    try:
        results = {target: [] for target in TARGETS}
        for r in range(a.rounds):
            for target in TARGETS:
                url = grpc_url if target.startswith("ensemble") else api_url
                name = target.strip("/").split()[0].replace("/", "_")
                results[target].append(profile(target, url, tokenizer, work / f"round{r + 1}-{name}", a))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    print(f"genai-perf, streaming, concurrency {a.concurrency}, 64-token prompts, {a.tokens} tokens each, "
          f"{a.requests} requests per run, {a.rounds} rounds alternating (artifacts in {work}):")
    for target, rounds in results.items():
        for i, f in enumerate(rounds):
            print(f"  {target:24s} round {i + 1}: {f['tokens/s']:7.1f} tokens/s, "
                  f"TTFT p50 {f['Time To First Token']:7.1f} ms, ITL p50 {f['Inter Token Latency']:5.1f} ms")
    for target in list(TARGETS)[1:]:
        for i, (api, ens) in enumerate(zip(results[target], results["ensemble_stream (gRPC)"])):
            print(f"  round {i + 1}: {target} / ensemble_stream tokens/s = {api['tokens/s'] / ens['tokens/s']:.2f}x, "
                  f"TTFT p50 {api['Time To First Token'] - ens['Time To First Token']:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
