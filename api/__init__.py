"""The HTTP API: OpenAI- and Megatron-compatible routes translated onto the Triton ensembles over gRPC.

It is a client of Triton like any other (``python -m api``), so it can stand in front of any replica; rank 0's
serving process starts it beside Triton when ``API=1`` (the default). See docs/api.md.
"""
