"""The engine layer: continuous batching, per-row sampling and the request record (rank 0 only).

``generation`` imports no torch, so the serving process can validate and mirror requests without it.
"""
