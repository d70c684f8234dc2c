"""The model repository's configs agree with the request surface (preprocessing/params.py) and each other."""

import importlib.util
import pathlib

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from preprocessing.params import SCALARS, WORD_LISTS

ROOT = pathlib.Path(__file__).resolve().parents[2]
REPO = ROOT / "model_repository"
ENSEMBLES = {"ensemble": "megatron_gpt", "ensemble_stream": "megatron_gpt_stream"}


def config(name):
    return text_format.Parse((REPO / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def spec(tensor):
    return model_config_pb2.DataType.Name(tensor.data_type), list(tensor.dims), tensor.optional


def test_configs_are_generated_from_the_request_surface():
    module = importlib.util.spec_from_file_location("make_repo", ROOT / "tools" / "make_model_repository.py")
    make_repo = importlib.util.module_from_spec(module)
    module.loader.exec_module(make_repo)
    for name, text in make_repo.configs().items():
        assert (REPO / name / "config.pbtxt").read_text() == text, f"{name} is stale: run the generator"


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_inputs_are_the_request_surface(name):
    inputs = {t.name: spec(t) for t in config(name).input}
    # All optional to Triton: an ensemble deadlocks on a missing required input instead of refusing it, so
    # preprocessing refuses a missing text_input or max_tokens itself (tests/functional/test_fuzz.py).
    assert inputs.pop("text_input") == ("TYPE_STRING", [1], True)
    assert inputs.pop("stream") == ("TYPE_BOOL", [1], True)
    expected = {n: (s.triton_type, [1], True) for n, s in SCALARS.items()}
    expected |= {n: ("TYPE_STRING", [-1], True) for n in WORD_LISTS}
    assert inputs == expected


@pytest.mark.parametrize("name", ENSEMBLES)
def test_ensemble_outputs_use_tensorrtllm_names(name):
    names = [t.name for t in config(name).output]
    assert names[:6] == ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "cum_log_probs",
                         "output_log_probs"]
    # then DESIGN.md's scoring outputs, the alternatives two-dimensional per request
    dims = {t.name: list(t.dims) for t in config(name).output[6:]}
    assert dims == {"output_tokens": [-1], "prompt_tokens": [-1], "prompt_log_probs": [-1],
                    "output_top_log_probs": [-1, -1], "output_top_tokens": [-1, -1],
                    "prompt_top_log_probs": [-1, -1], "prompt_top_tokens": [-1, -1], "output_token_ids": [-1],
                    "prompt_token_ids": [-1]}


@pytest.mark.parametrize("name", ENSEMBLES)
def test_every_step_maps_existing_tensors(name):
    from triton_backend.serving.binding import stream_tensors, tensors

    generated = {"megatron_gpt": tensors(), "megatron_gpt_stream": stream_tensors()}
    ens = config(name)
    produced = {t.name for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        for key, value in step.input_map.items():
            assert value in produced, f"{step.model_name}.{key} reads {value}, which nothing produced yet"
        if step.model_name in generated:  # configured by PyTriton from binding.py
            inputs, outputs = generated[step.model_name]
            declared_in, declared_out = {t.name for t in inputs}, {t.name for t in outputs}
            assert set(step.input_map) == declared_in
        else:
            declared_in = {t.name for t in config(step.model_name).input}
            declared_out = {t.name for t in config(step.model_name).output}
            assert set(step.input_map) <= declared_in
        assert set(step.output_map) <= declared_out
        produced |= set(step.output_map.values())
    assert {t.name for t in ens.output} <= produced
    assert [s.model_name for s in ens.ensemble_scheduling.step][1] == ENSEMBLES[name]
