"""``python -m api``: the HTTP API in front of a running Triton (its gRPC port from GRPC_PORT or TRITON_GRPC_URL)."""

from __future__ import annotations

import sys

import uvicorn

from .app import create_app
from .settings import Settings


def main() -> int:
    try:
        settings = Settings.from_env()
    except (KeyError, ValueError) as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    # On SIGTERM uvicorn stops accepting and lets requests in flight finish (up to the grace below).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
