"""Server configuration from the environment: validation and the start-up port check."""

import socket

import pytest

from triton_backend.config import ServerConfig


def test_variables_are_read_and_bad_values_named():
    cfg = ServerConfig.from_env({"TP": "2", "HTTP_PORT": "9100", "DEVICE": "cpu", "MAX_SLOTS": "8"})
    assert (cfg.tensor_parallel, cfg.http_port, cfg.max_slots) == (2, 9100, 8)
    with pytest.raises(ValueError, match="HTTP_PORT must be a TCP port"):
        ServerConfig.from_env({"HTTP_PORT": "70000", "DEVICE": "cpu"})
    with pytest.raises(ValueError, match="must differ"):
        ServerConfig.from_env({"HTTP_PORT": "9100", "GRPC_PORT": "9100", "DEVICE": "cpu"})
    with pytest.raises(ValueError, match="API_PORT must differ|must differ, got \\[8000, 8001, 8002, 8000\\]"):
        ServerConfig.from_env({"API_PORT": "8000", "DEVICE": "cpu"})
    assert ServerConfig.from_env({"API_PORT": "8000", "API": "0", "DEVICE": "cpu"}).api == 0
    with pytest.raises(ValueError, match="API must be 0 or 1, got 2"):
        ServerConfig.from_env({"API": "2", "DEVICE": "cpu"})
    with pytest.raises(ValueError, match="COMPILE must be 0 or 1, got 2"):
        ServerConfig.from_env({"COMPILE": "2", "DEVICE": "cpu"})
    assert ServerConfig.from_env({"COMPILE": "0", "DEVICE": "cpu"}).compile == 0
    with pytest.raises(ValueError, match="CUDA_GRAPHS must be 0 or 1, got -1"):
        ServerConfig.from_env({"CUDA_GRAPHS": "-1", "DEVICE": "cpu"})
    with pytest.raises(ValueError, match="ATTENTION must be auto, flex or torch, got 'paged'"):
        ServerConfig.from_env({"ATTENTION": "paged", "DEVICE": "cpu"})
    with pytest.raises(ValueError, match="MAX_SLOTS must be at least 1"):
        ServerConfig.from_env({"MAX_SLOTS": "0", "DEVICE": "cpu"})
    with pytest.raises(ValueError, match="TP must be at least 1"):
        ServerConfig.from_env({"TP": "0", "DEVICE": "cpu"})
    with pytest.raises(ValueError, match="DRAIN_TIMEOUT_S must be 0 or more, got -1"):
        ServerConfig.from_env({"DRAIN_TIMEOUT_S": "-1", "DEVICE": "cpu"})
    with pytest.raises(ValueError, match="KV_CACHE_MB must be an integer, got '2G'"):
        ServerConfig.from_env({"KV_CACHE_MB": "2G", "DEVICE": "cpu"})
    assert ServerConfig.from_env({"DRAIN_TIMEOUT_S": "0", "DEVICE": "cpu"}).drain_timeout_s == 0
    assert ServerConfig.from_env({"PP_LAYERS": "14,10", "DEVICE": "cpu"}).pp_layers == "14,10"
    assert ServerConfig.from_env({"PP_LAYERS": "balanced", "DEVICE": "cpu"}).pp_layers == "balanced"
    with pytest.raises(ValueError, match="PP_LAYERS must be 'balanced' or the layers of each stage.*'even'"):
        ServerConfig.from_env({"PP_LAYERS": "even", "DEVICE": "cpu"})


def test_busy_ports_names_only_the_taken_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        free = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                free.append(s.getsockname()[1])
        cfg = ServerConfig(host="127.0.0.1", http_port=free[0], grpc_port=taken, metrics_port=free[1], device="cpu",
                           api=0)
        assert cfg.busy_ports() == [f"GRPC_PORT {taken}"]
        with_api = ServerConfig(host="127.0.0.1", http_port=free[0], grpc_port=free[1], metrics_port=9100,
                                api_port=taken, device="cpu")
        assert with_api.busy_ports() == [f"API_PORT {taken}"]
    assert cfg.busy_ports() == []


def test_every_variable_is_in_the_readme_table():
    import dataclasses
    import pathlib

    from triton_backend.config import _variable

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("\n## ", readme.index("## Configuration") + 1)]
    missing = [_variable(f.name) for f in dataclasses.fields(ServerConfig) if f"`{_variable(f.name)}`" not in table]
    assert not missing, f"not in the README's configuration table: {missing}"


def test_the_cpu_kv_budget_leaves_out_what_the_packed_weights_will_take(monkeypatch):
    import collections

    from triton_backend import server

    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(server.psutil, "virtual_memory", lambda: memory(10 * 2**30))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = ServerConfig.from_env({"DEVICE": "cpu"})
    assert server.kv_budget(cfg) == 5 * 2**30  # half of what is available
    assert server.kv_budget(cfg, pending_bytes=2 * 2**30) == 4 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine, each packing its shard
    assert server.kv_budget(cfg, pending_bytes=2 * 2**30) == int(1.5 * 2**30)
    assert server.kv_budget(ServerConfig.from_env({"DEVICE": "cpu", "KV_CACHE_MB": "64"}), 2**30) == 64 * 2**20
