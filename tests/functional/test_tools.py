"""perf_analyzer from the venv and the project's CLI, against the real server."""

import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["ensemble", "ensemble_stream"])
def test_perf_analyzer_reports_a_throughput(server, tmp_path, model):
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"text_input": ["The for statement"], "max_tokens": [8]}]}))
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    env = {**os.environ, "LD_LIBRARY_PATH": str(site / "nvidia" / "cuda_runtime" / "lib")}
    # Decoupled models are measured over gRPC streaming only.
    protocol = ["-u", server.http] if model == "ensemble" else ["-u", server.grpc, "-i", "grpc", "--streaming",
                                                                  "--async"]
    command = [
        str(pathlib.Path(sys.executable).parent / "perf_analyzer"), "-m", model, *protocol,
        "--input-data", str(data), "--concurrency-range", "2:2", "--measurement-interval", "2000",
        "--max-trials", "3", "--stability-percentage", "100",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    match = re.search(r"Concurrency: 2, throughput: ([\d.]+) infer/sec", run.stdout)
    assert match and float(match.group(1)) > 0, run.stdout


def test_cli_prints_the_generated_text(server):
    command = [sys.executable, "-m", "client", "The for statement", "--url", server.grpc, "--protocol", "grpc",
               "--max-tokens", "8", "--temperature", "0", "--json"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["num_output_tokens"] > 0 and out["finish_reason"] in ("stop", "length")
    bad = subprocess.run(command[:-1] + ["--top-p", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "top_p" in bad.stderr
