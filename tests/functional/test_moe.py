"""A mixture-of-experts checkpoint served by the real server: the ``moe`` preset (Mixtral-style, 8 experts, top-2)
at TP=1 and with its experts split over two ranks (TP=2, EP=2, gloo), the same text; and the tokens routed to
each expert on Triton's metrics port."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from .conftest import start_server, stop_server
from .test_tensor_parallel import assert_same, make_checkpoint, outputs, serve_and_collect

pytestmark = pytest.mark.timeout(600)


def expert_counters(metrics_url: str) -> dict[tuple[int, int], float]:
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(r'^llm_moe_expert_tokens_total\{(?=[^}]*expert="(\d+)")(?=[^}]*layer="(\d+)")[^}]*\} (\S+)$',
                       text, re.MULTILINE)
    return {(int(layer), int(expert)): float(value) for expert, layer, value in found}


def test_experts_split_over_two_ranks_serve_one_ranks_text_and_count_their_tokens(tmp_path):
    ckpt = make_checkpoint(tmp_path / "moe", 1, "--random", "moe", "--init-std", "0.2", "--format", "legacy")
    one = serve_and_collect(tmp_path, "moe_tp1", CHECKPOINT=str(ckpt))
    assert len({r.text for r in one}) == len(one)
    server = start_server(tmp_path / "moe_ep2", CHECKPOINT=str(ckpt), TP="2", EP="2")
    try:
        two = outputs(server)
        counters, previous = {}, None
        for _ in range(20):  # the counters follow the engine every half second: until they settle
            counters = expert_counters(server.metrics)
            if counters and counters == previous:
                break
            previous = counters
            time.sleep(0.6)
    finally:
        assert stop_server(server) is not None
    assert_same(two, one, "moe TP=2 EP=2 vs TP=1")
    assert sorted({layer for layer, _ in counters}) == [1, 2] and len(counters) == 16, counters
    per_layer = [sum(v for (layer, _), v in counters.items() if layer == n) for n in (1, 2)]
    assert per_layer[0] == per_layer[1] > 0  # every token goes through both layers, to 2 experts in each
    assert per_layer[0] % 2 == 0
