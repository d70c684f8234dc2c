"""The GPU check's tools run dry on CPU with a small model: ``tools/gpu_decode.py``'s decode figures (the same code
path: the static steps, FlexAttention over the group-major cache; every case and the bytes each step must read),
and ``tools/gpu_megatron_engine.py``'s comparison with Megatron's dynamic engine (our half, and the weights)."""

from __future__ import annotations

import json

from tools import gpu_decode


def test_a_dry_run_times_each_case_against_the_bytes_it_must_read(capsys):
    assert gpu_decode.main(["--tiny", "--device", "cpu", "--rows", "1", "2", "--context", "40", "100", "--steps",
                            "2", "--prefill", "48", "--bandwidth-gbs", "10"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    head, cases, prefill, syncs = lines[0], lines[1:5], lines[5], lines[6]
    assert head["flex"] and head["graphs"] and head["device"] == "cpu"
    assert [(c["rows"], c["context"]) for c in cases] == [(1, 40), (1, 100), (2, 40), (2, 100)]
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 groups of head_dim 16, float32
    weights = head["weights_gb"] * 1e9
    for c in cases:
        assert abs(c["needed_gb"] * 1e9 - weights - c["rows"] * c["context"] * per_token) < 1e6
        assert c["step_ms"] > 0 and "fraction_of_bandwidth" in c and "step_over_ideal" in c
    assert prefill["prefill_tokens"] == 48 and prefill["prefill_tokens_per_s"] > 0
    assert syncs == {"device_waits_per_decode_step": "not checked (CPU)", "target": 1}


def test_bandwidth_by_the_gpus_name():
    assert gpu_decode.bandwidth("NVIDIA H100 80GB HBM3") == 3350e9
    assert gpu_decode.bandwidth("NVIDIA H100 PCIe") == 2000e9
    assert gpu_decode.bandwidth("NVIDIA H200") == 4800e9
    assert gpu_decode.bandwidth("Tesla T4") is None


def test_the_megatron_comparison_runs_ours_dry_and_gives_megatron_our_weights(capsys):
    """``tools/gpu_megatron_engine.py`` on CPU: our engine's figure, a line saying Megatron's dynamic engine needs
    CUDA, and the twin Megatron would serve (its own RoPE, a copy of our state dict) giving our model's logits."""
    from tools import gpu_megatron_engine

    assert gpu_megatron_engine.main(["--tiny", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    head, ours, megatron, twin = lines
    assert head["streams"] == 4 and head["output_tokens"] == 16
    assert ours["engine"] == "ours" and ours["output_tokens_per_s"] > 0
    assert megatron == {"megatron_dynamic_engine": "needs CUDA"}
    assert twin["twin_max_logit_diff"] < 1e-4
