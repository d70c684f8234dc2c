"""Client for the megatron-triton ensemble over HTTP or gRPC (``python -m client "prompt"``)."""

from .generate import GenerationClient, GenerationError

__all__ = ["GenerationClient", "GenerationError"]
