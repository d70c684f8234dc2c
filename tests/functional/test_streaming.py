"""ensemble_stream over gRPC and HTTP SSE: deltas that add up to the unary text, stop words, contract."""

import json
import time

import pytest
import requests

from client import GenerationClient, GenerationError

PROMPT = "The for statement"
SAMPLED = dict(max_tokens=40, temperature=0.9, top_p=0.95, seed=21, end_id=-1)


def test_streamed_deltas_concatenate_to_the_unary_text(server):
    with GenerationClient(server.grpc, "grpc") as c:
        unary = c.generate(PROMPT, **SAMPLED, return_log_probs=True)
        parts = list(c.stream(PROMPT, **SAMPLED, return_log_probs=True))
    assert len(parts) > 5  # it streamed
    assert "".join(p.text for p in parts) == unary.text
    assert [p.finish_reason for p in parts[:-1]] == [""] * (len(parts) - 1)
    assert parts[-1].finish_reason == unary.finish_reason == "length"
    assert parts[-1].num_output_tokens == unary.num_output_tokens == 40
    assert [x for p in parts for x in p.output_log_probs] == pytest.approx(unary.output_log_probs, abs=1e-5)
    assert parts[-1].cum_log_probs == pytest.approx(unary.cum_log_probs, abs=1e-3)
    totals = [p.num_output_tokens for p in parts]
    assert totals == sorted(totals)  # running totals


def test_prompt_comes_first_when_not_excluded(server):
    with GenerationClient(server.grpc, "grpc") as c:
        parts = list(c.stream(PROMPT, **SAMPLED, exclude_input_in_output=False))
        unary = c.generate(PROMPT, **SAMPLED, exclude_input_in_output=False)
    assert parts[0].text.startswith(PROMPT)
    assert "".join(p.text for p in parts) == unary.text
    assert parts[0].output_log_probs == [] and parts[0].cum_log_probs == 0.0


def test_http_generate_stream_sends_server_sent_events(server):
    body = {"text_input": PROMPT, **SAMPLED}
    with requests.post(f"http://{server.http}/v2/models/ensemble_stream/generate_stream", json=body,
                       stream=True, timeout=120) as reply:
        assert reply.status_code == 200
        events = [json.loads(line[len(b"data: "):]) for line in reply.iter_lines() if line.startswith(b"data: ")]
    unary = requests.post(f"http://{server.http}/v2/models/ensemble/generate", json=body, timeout=120).json()
    assert len(events) > 5
    assert "".join(e["text_output"] for e in events) == unary["text_output"]
    assert events[-1]["finish_reason"] == "length"


def test_stop_word_across_token_boundaries_stops_early_in_both_modes(server):
    with GenerationClient(server.grpc, "grpc") as c:
        full = c.generate(PROMPT, **SAMPLED)
        # A stop word that starts inside one token and ends inside another (if the text allows it).
        start = len(full.text) // 3
        stop = full.text[start : start + 5]
        assert stop.strip(), full.text
        unary = c.generate(PROMPT, **SAMPLED, stop_words=[stop, "never appears 42"])
        parts = list(c.stream(PROMPT, **SAMPLED, stop_words=[stop]))
    expected = full.text[: full.text.index(stop)]
    assert unary.text == expected and unary.finish_reason == "stop"
    assert unary.num_output_tokens < full.num_output_tokens
    assert "".join(p.text for p in parts) == expected and parts[-1].finish_reason == "stop"


def test_bad_words_are_never_generated_with_or_without_a_leading_space(server):
    """A bad word is banned as written (where the text glues it to what comes before) and after a space (a word
    in running text): the words greedy decoding chose are absent once banned, over unary and streaming."""
    greedy = dict(max_tokens=24, temperature=0.0, end_id=-1, repetition_penalty=1.3)
    with GenerationClient(server.grpc, "grpc") as c:
        text = c.generate(PROMPT, **greedy).text
        spaced = max((w for w in text.split() if f" {w}" in text), key=len)  # a word the model wrote after a space
        assert len(spaced) > 2, text
        banned = c.generate(PROMPT, **greedy, bad_words=[spaced])
        streamed = "".join(p.text for p in c.stream(PROMPT, **greedy, bad_words=[spaced]))
        # Without the space: a prompt that ends in a space makes the model start a word with no space before it.
        glued = c.generate(PROMPT + " ", **greedy).text
        first = glued.split()[0] if glued.split() else ""
        assert glued.startswith(first) and len(first) > 1, glued
        banned_glued = c.generate(PROMPT + " ", **greedy, bad_words=[first])
    assert spaced in text and spaced not in banned.text and spaced not in streamed
    assert banned.text == streamed
    assert not banned_glued.text.startswith(first) and first not in banned_glued.text


def test_presence_and_frequency_penalties_stop_greedy_repetition(server):
    """The demo model loops under greedy decoding; both penalties push it off tokens it already generated."""
    greedy = dict(max_tokens=48, temperature=0.0, end_id=-1, return_log_probs=True)
    with GenerationClient(server.grpc, "grpc") as c:
        plain = c.generate(PROMPT, **greedy)
        presence = c.generate(PROMPT, **greedy, presence_penalty=2.0)
        frequency = c.generate(PROMPT, **greedy, frequency_penalty=1.0)
        negative = c.generate(PROMPT, **greedy, presence_penalty=-2.0)
    words = plain.text.split()
    assert len(set(words)) < len(words)  # it repeats itself without a penalty
    for penalised in (presence, frequency):
        assert penalised.text != plain.text
        assert len(set(penalised.text.split())) > len(set(words))
    assert len(set(negative.text.split())) <= len(set(words))  # a negative penalty favours repeats


def test_stream_flag_goes_to_the_right_ensemble(server):
    with GenerationClient(server.http) as c:
        with pytest.raises(GenerationError, match="'stream'.*ensemble_stream") as err:
            c.generate(PROMPT, max_tokens=4, stream=True)
        assert str(err.value.status) == "400"
    with GenerationClient(server.grpc, "grpc") as c:
        with pytest.raises(GenerationError, match="'stream'.*always streams") as err:
            list(c.stream(PROMPT, max_tokens=4, stream=False))
        assert "Traceback" not in str(err.value) and ".py" not in str(err.value)  # the rule, not our internals
        with pytest.raises(GenerationError, match="'top_p'"):
            list(c.stream(PROMPT, max_tokens=4, top_p=3.0))
        assert "".join(p.text for p in c.stream(PROMPT, max_tokens=3)) != ""  # still serving


def test_many_concurrent_streams_share_the_engine(server):
    import concurrent.futures

    def one(i):
        with GenerationClient(server.grpc, "grpc") as c:
            parts = list(c.stream(PROMPT, max_tokens=16, temperature=0.8, seed=i, end_id=-1))
            unary = c.generate(PROMPT, max_tokens=16, temperature=0.8, seed=i, end_id=-1)
        return "".join(p.text for p in parts), unary.text

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        pairs = list(pool.map(one, range(12)))
    assert all(streamed == unary for streamed, unary in pairs)


def llm_metrics(server) -> dict:
    status, body = server.get("/metrics", port_url=server.metrics)
    values = {}
    for line in body.decode().splitlines():
        if line.startswith("llm_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_llm_metrics_on_the_metrics_port(server):
    import concurrent.futures

    before = settled_metrics(server)  # the earlier tests' last counts are sent within half a second

    def one(i):
        with GenerationClient(server.grpc, "grpc") as c:
            if i % 2:
                parts = list(c.stream(PROMPT, max_tokens=6 + i, end_id=-1))
                return parts[-1].num_input_tokens, parts[-1].num_output_tokens
            r = c.generate(PROMPT, max_tokens=6 + i, end_id=-1)
            return r.num_input_tokens, r.num_output_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(one, range(8)))
    expected = {"llm_output_tokens_total": sum(n for _, n in counts),
                "llm_input_tokens_total": sum(n for n, _ in counts),
                "llm_time_to_first_token_seconds_count": 8, "llm_inter_token_latency_seconds_count": 8}

    def deltas() -> dict:
        after = llm_metrics(server)
        return {name: after[name] - before[name] for name in expected}

    # postprocessing sends them every half second (model_repository/postprocessing/1/model.py)
    assert wait_for(lambda: deltas() == expected), (deltas(), expected)
    assert wait_for(lambda: idle(llm_metrics(server))), llm_metrics(server)  # the gauges return to zero


def test_a_repeated_prompt_is_read_from_the_prefix_cache(server):
    """The second time, every full 32-token block of the prompt but the one holding its last token comes from the
    cache (it must still be computed for its logits); the text is the same, and /metrics counts both."""
    prompt = " ".join(["Generators yield their values one at a time, lazily, to whoever iterates them."] * 5)
    before = settled_metrics(server)  # the load counters follow the engine every 0.5 s: none may be in transit
    with GenerationClient(server.grpc, "grpc") as c:
        first = c.generate(prompt, max_tokens=8, temperature=0.0, end_id=-1)
        second = c.generate(prompt, max_tokens=8, temperature=0.0, end_id=-1)
    n = first.num_input_tokens
    assert n > 64 and second.text == first.text

    def counted() -> bool:
        after = llm_metrics(server)
        return (after["llm_prefix_cache_queried_tokens_total"] - before["llm_prefix_cache_queried_tokens_total"]
                == 2 * n and after["llm_prefix_cache_hit_tokens_total"] - before["llm_prefix_cache_hit_tokens_total"]
                == (n - 1) // 32 * 32)
    assert wait_for(counted), (n, {k: v - before[k] for k, v in llm_metrics(server).items() if "prefix" in k})


def settled_metrics(server, timeout_s: float = 30.0) -> dict:
    """The metrics once two reads a gauge refresh and more apart agree."""
    deadline = time.monotonic() + timeout_s
    last = llm_metrics(server)
    while time.monotonic() < deadline:
        time.sleep(1.1)
        now = llm_metrics(server)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the metrics kept changing for {timeout_s} s: {last}")


def idle(metrics: dict) -> bool:
    return metrics["llm_running_sequences"] == metrics["llm_waiting_sequences"] == 0 == \
        metrics["llm_kv_cache_usage_ratio"]


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    """The load gauges are refreshed twice a second: poll instead of reading once."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_cancelled_streams_free_their_slots(server):
    """gRPC cancellation and HTTP disconnects reach the engine, which retires the generation early."""
    import concurrent.futures

    before = llm_metrics(server)["llm_requests_cancelled_total"]

    def cancel_grpc(_):
        with GenerationClient(server.grpc, "grpc") as c:
            for i, _part in enumerate(c.stream(PROMPT, max_tokens=200, end_id=-1)):
                if i == 2:
                    break  # leaving the loop cancels the request

    def drop_http(_):
        url = f"http://{server.http}/v2/models/ensemble_stream/generate_stream"
        with requests.post(url, json={"text_input": PROMPT, "max_tokens": 200, "end_id": -1}, stream=True) as r:
            events = (line for line in r.iter_lines() if line.startswith(b"data:"))
            next(events), next(events)  # then the connection closes

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: (cancel_grpc if i % 2 else drop_http)(i), range(4)))
    # Only the engine retiring a generation as cancelled moves this counter (200 tokens would end by length).
    assert wait_for(lambda: llm_metrics(server)["llm_requests_cancelled_total"] - before == 4), llm_metrics(server)
    assert wait_for(lambda: idle(llm_metrics(server)))
    with GenerationClient(server.grpc, "grpc") as c:  # and the server goes on serving
        assert c.generate(PROMPT, max_tokens=4, end_id=-1).num_output_tokens == 4
