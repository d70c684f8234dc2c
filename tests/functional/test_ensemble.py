"""The whole pipeline over HTTP, gRPC and /generate against a real server on the demo model."""

import concurrent.futures
import json

import numpy as np
import pytest
import requests

from client import GenerationClient, GenerationError

from .conftest import start_server, stop_server

PROMPT = "The for statement is used to"


def generate_endpoint(server, body):
    return requests.post(f"http://{server.http}/v2/models/ensemble/generate", json=body, timeout=120)


def test_http_grpc_and_generate_give_the_same_greedy_text(server):
    with GenerationClient(server.http, "http") as h, GenerationClient(server.grpc, "grpc") as g:
        over_http = h.generate(PROMPT, max_tokens=24, temperature=0.0)
        over_grpc = g.generate(PROMPT, max_tokens=24, temperature=0.0)
    reply = generate_endpoint(server, {"text_input": PROMPT, "max_tokens": 24, "temperature": 0.0})
    assert reply.status_code == 200, reply.text
    assert over_http.text and over_http.num_output_tokens > 0
    assert over_http.text == over_grpc.text == reply.json()["text_output"]
    assert over_http.finish_reason in ("stop", "length")
    assert reply.json()["num_input_tokens"] == over_http.num_input_tokens > 0


def test_outputs_follow_the_contract(server):
    with GenerationClient(server.http) as c:
        r = c.generate(PROMPT, max_tokens=5, temperature=0.0, end_id=-1, return_log_probs=True,
                       exclude_input_in_output=False)
        plain = c.generate(PROMPT, max_tokens=5, temperature=0.0, end_id=-1)
    assert r.finish_reason == "length" and r.num_output_tokens == 5
    assert r.text == PROMPT + plain.text
    assert len(r.output_log_probs) == 5 and all(lp <= 0 for lp in r.output_log_probs)
    assert r.cum_log_probs == pytest.approx(sum(r.output_log_probs), abs=1e-4)
    assert plain.cum_log_probs == 0.0 and plain.output_log_probs == []


def test_seeded_sampling_is_reproducible_and_seeds_differ(server):
    with GenerationClient(server.grpc, "grpc") as c:
        a = c.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7, end_id=-1)
        b = c.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7, end_id=-1)
        others = {c.generate(PROMPT, max_tokens=16, temperature=1.0, seed=s, end_id=-1).text for s in range(3)}
    assert a.text == b.text
    assert len(others | {a.text}) > 1


def stats(server, model):
    status, body = server.get(f"/v2/models/{model}/stats")
    assert status == 200
    return json.loads(body)["model_stats"][0]


def batch_counts(server, model):
    """How many times the model has executed a batch of each size since the server started."""
    return {b["batch_size"]: int(b["compute_infer"]["count"]) for b in stats(server, model)["batch_stats"]}


def test_sixteen_concurrent_mixed_requests_are_batched(server):
    prompts = [("word " * (1 + 3 * i)).strip() + " The" for i in range(16)]
    params = [dict(max_tokens=12, temperature=0.0) if i % 2 == 0 else
              dict(max_tokens=8 + i, temperature=0.7, top_k=40, top_p=0.9, seed=i) for i in range(16)]
    before = batch_counts(server, "megatron_gpt")

    def one(i):
        protocol, url = ("http", server.http) if i % 2 else ("grpc", server.grpc)
        with GenerationClient(url, protocol) as c:
            return c.generate(prompts[i], **params[i])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r.num_output_tokens > 0 for r in results)
    for i in (0, 1, 6, 7):  # each got what it asked for, whatever it was batched with
        alone = one(i)
        assert (alone.text, alone.num_output_tokens) == (results[i].text, results[i].num_output_tokens)
        if params[i]["temperature"] > 0:
            assert results[i].num_output_tokens <= params[i]["max_tokens"]
    # Earlier tests may already have run batches of any size: count this test's executions, not sizes seen.
    after = batch_counts(server, "megatron_gpt")
    sizes = {size for size, count in after.items() if count > before.get(size, 0)}
    assert max(sizes, default=1) > 1, f"megatron_gpt never executed a batch larger than one: {sizes}"


BAD = [
    ("max_tokens", dict(max_tokens=0), "max_tokens"),
    ("top_p", dict(max_tokens=4, top_p=2.0), "top_p"),
    ("empty", dict(max_tokens=4), "text_input"),
    ("too_long", dict(max_tokens=4), "text_input"),
    ("beyond_context", dict(max_tokens=100000), "max_tokens"),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case, params, field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_tensor_and_the_server_keeps_serving(server, protocol, case, params, field):
    prompt = {"empty": "", "too_long": "word " * 2000}.get(case, PROMPT)
    url = server.http if protocol == "http" else server.grpc
    with GenerationClient(url, protocol) as c:
        with pytest.raises(GenerationError) as err:
            c.generate(prompt, **params)
        assert f"'{field}'" in str(err.value)
        assert str(err.value.status) in ("400", "StatusCode.INVALID_ARGUMENT")
        assert c.generate(PROMPT, max_tokens=2).num_output_tokens > 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_wrong_dtype_is_refused_with_the_tensor_named(server, protocol):
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    client = tc.InferenceServerClient(server.http if protocol == "http" else server.grpc)
    text = tc.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
    wrong = tc.InferInput("max_tokens", [1, 1], "FP32")
    wrong.set_data_from_numpy(np.array([[4.0]], dtype=np.float32))
    with pytest.raises(Exception) as err:
        client.infer("ensemble", [text, wrong])
    assert "max_tokens" in err.value.message() and "INT32" in err.value.message()
    client.close()


def test_a_bad_request_does_not_disturb_its_batch(server):
    def good(i):
        with GenerationClient(server.grpc, "grpc") as c:
            return c.generate(PROMPT, max_tokens=6, temperature=0.0)

    def bad(i):
        with GenerationClient(server.grpc, "grpc") as c:
            try:
                c.generate(PROMPT, max_tokens=4, top_p=5.0)
            except GenerationError as err:
                return err
        return None

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(good, i) for i in range(8)]
        bads = [pool.submit(bad, i) for i in range(4)]
    assert len({f.result().text for f in goods}) == 1
    assert all(isinstance(f.result(), GenerationError) for f in bads)


def test_model_control_needs_the_admin_token(server):
    """Loading a model runs its code: repository index, load and unload are refused without the token over HTTP
    and gRPC, and nothing is unloaded; statistics stay open (perf_analyzer reads them)."""
    import tritonclient.grpc as grpcclient

    for path in ("index", "models/ensemble/load", "models/ensemble/unload", "models/megatron_gpt/unload"):
        reply = requests.post(f"http://{server.http}/v2/repository/{path}", timeout=10)
        assert reply.status_code in (401, 403), (path, reply.status_code, reply.text)
        assert "triton-access-token" in reply.text
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        for call in (client.get_model_repository_index, lambda: client.load_model("ensemble"),
                     lambda: client.unload_model("ensemble")):
            with pytest.raises(grpcclient.InferenceServerException, match="triton-access-token"):
                call()
        assert client.get_inference_statistics("ensemble").model_stats[0].name == "ensemble"
    finally:
        client.close()
    assert requests.get(f"http://{server.http}/v2/models/ensemble/stats", timeout=10).status_code == 200
    assert server.get("/v2/models/ensemble/ready")[0] == 200
    assert server.get("/v2/models/megatron_gpt/ready")[0] == 200


def test_model_control_opens_with_the_admin_token(tmp_path):
    import tritonclient.grpc as grpcclient

    token = "a-token-for-the-test"
    server = start_server(tmp_path / "admin", ADMIN_TOKEN=token)
    try:
        index = f"http://{server.http}/v2/repository/index"
        assert requests.post(index, headers={"triton-access-token": "wrong"}, timeout=10).status_code in (401, 403)
        reply = requests.post(index, headers={"triton-access-token": token}, timeout=10)
        assert reply.status_code == 200, reply.text
        assert {"ensemble", "ensemble_stream", "preprocessing", "postprocessing"} <= {m["name"] for m in reply.json()}
        client = grpcclient.InferenceServerClient(server.grpc)
        try:
            models = client.get_model_repository_index(headers={"triton-grpc-protocol-triton-access-token": token})
            assert "ensemble" in {m.name for m in models.models}
        finally:
            client.close()
    finally:
        stop_server(server)


def test_metrics_port_counts_ensemble_requests(server):
    status, body = server.get("/metrics", port_url=server.metrics)
    assert status == 200
    assert 'nv_inference_request_success{model="ensemble"' in body.decode()
