"""The API server's settings, read from the same environment variables as the rest of the job."""

from __future__ import annotations

import dataclasses
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_MODEL_NAME = "megatron-gpt"


@dataclasses.dataclass(frozen=True)
class Settings:
    triton_grpc: str  # host:port of Triton's gRPC endpoint
    host: str
    port: int
    context: int  # the model's context in tokens (prompt + generated)
    tokenizer: str = ""  # the job's tokenizer spec (JSON, preprocessing/tokenization/spec.py)
    model_name: str = DEFAULT_MODEL_NAME
    api_key: str = ""
    chat_template: pathlib.Path | None = None
    timeout_s: float = 600.0  # a unary request's deadline on its way through Triton
    max_queue: int = 1024  # the engine's MAX_QUEUE: one call may not fan out to more requests than it takes

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        host = env.get("HOST", "0.0.0.0")
        local = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        template = env.get("CHAT_TEMPLATE", "")
        return cls(
            triton_grpc=env.get("TRITON_GRPC_URL") or f"{local}:{env.get('GRPC_PORT', '8001')}",
            host=host,
            port=_port(env.get("API_PORT", "9000")),
            context=int(env["MEGATRON_TRITON_CONTEXT"]),
            tokenizer=_tokenizer_spec(env),
            model_name=env.get("MODEL_NAME") or DEFAULT_MODEL_NAME,
            api_key=env.get("API_KEY", ""),
            chat_template=pathlib.Path(template) if template else None,
            timeout_s=float(env.get("MAX_REQUEST_S") or 600),
            max_queue=int(env.get("MAX_QUEUE") or 1024),
        )


def _port(raw: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"API_PORT must be a TCP port, got {raw!r}")
    return int(raw)


def _tokenizer_spec(env) -> str:
    """The spec rank 0 exported; run on its own, the API reads TOKENIZER (and TOKENIZER_TYPE) instead."""
    from preprocessing import tokenization

    if env.get(tokenization.ENV):
        return env[tokenization.ENV]
    if not env.get("TOKENIZER"):
        raise ValueError(f"set TOKENIZER (a tokenizer file or directory) or {tokenization.ENV}")
    return tokenization.resolve(None, env["TOKENIZER"], env.get("TOKENIZER_TYPE") or None).to_json()
